"""The BTM stages: seed → (branch → train → merge) per cycle. One module per stage."""
