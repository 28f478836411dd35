"""A separate process that merges one expert into a forest (used by the concurrency and SIGKILL
tests). Usage: forest_worker.py ROOT ID DOMAIN CHECKPOINT [--go FILE] [--move]

With --go, waits until FILE exists, so that many workers start their merges at the same moment.
Prints "ok <sha256>" or "error <message>" and exits 0 or 1.
"""
import argparse
import sys
import time
from pathlib import Path

from megatron_btm.forest import Forest

ap = argparse.ArgumentParser()
ap.add_argument("root")
ap.add_argument("id")
ap.add_argument("domain")
ap.add_argument("checkpoint")
ap.add_argument("--go", default=None)
ap.add_argument("--move", action="store_true")
args = ap.parse_args()
if args.go:
    print("ready", flush=True)
    deadline = time.monotonic() + 60
    while not Path(args.go).exists() and time.monotonic() < deadline:
        time.sleep(0.002)
try:
    rec = Forest.open(args.root).add_expert(
        args.id, domain=args.domain, checkpoint_dir=args.checkpoint, parents=[("seed", 1.0)],
        cycle=1, steps=10, tokens=1000, config={"worker": args.id}, move=args.move)
except ValueError as e:
    print(f"error {e}")
    sys.exit(1)
print(f"ok {rec.checkpoint_sha256}")
