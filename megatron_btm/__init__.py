"""megatron-btm: Branch-Train-Merge (ELMForest) training on Megatron-Core.

Importing the package is cheap: Megatron-Core (≈3 s to import) is only imported by the modules
that build models, train or read checkpoints.
"""
__version__ = "0.1.0"
