"""Experiments: the paper-in-miniature runner behind `btm experiment PLAN.yaml`.

- `plan`: the validated plan (YAML) and its compute schedule.
- `units`: training / forest / evaluation building blocks, resumable.
- `runner`: the units of a plan in order, one JSON per finished unit under OUTPUT/runs/.
- `claims`: the report's numbers and verdicts from the run JSONs (pure).
- `report`: report.md, results.json and PNG plots.
"""
