"""A long-lived merge process: reads `FOREST RUN` lines on stdin, merges, answers `ok ID` or
`error MESSAGE` (torch is imported once, so many concurrent merges stay cheap)."""
import sys

from megatron_btm.stages.merge import merge_expert

for line in sys.stdin:
    forest, run = line.split()
    try:
        rec = merge_expert(forest, run)
        print(f"ok {rec.id}", flush=True)
    except Exception as e:  # report, keep serving
        print(f"error {type(e).__name__}: {e}".replace("\n", " "), flush=True)
