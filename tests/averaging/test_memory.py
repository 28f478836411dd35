"""Peak memory of average_checkpoints does not grow with the number of experts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from averaging_helpers import write_checkpoint

REPO = Path(__file__).resolve().parents[2]
ROWS, COLS = 2048, 1024  # one 8 MiB fp32 tensor
TENSOR_MIB = ROWS * COLS * 4 / 2**20

# Run in a grandchild: Linux carries ru_maxrss across fork+exec, so a child of this (large)
# pytest process would start at pytest's RSS; the child of a fresh small interpreter does not.
LAUNCH = "import subprocess, sys; sys.exit(subprocess.run([sys.executable, '-c', sys.argv[1], *sys.argv[2:]]).returncode)"
AVERAGE = """
import json, resource, sys
from megatron_btm.averaging.apply import average_checkpoints
dirs = sys.argv[2:]
average_checkpoints(dirs, [1.0 / len(dirs)] * len(dirs), sys.argv[1], progress=False)
print(json.dumps({"maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def peak_rss_mib(out: Path, dirs: list[Path]) -> float:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", LAUNCH, AVERAGE, str(out), *map(str, dirs)], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["maxrss_mib"]


@pytest.mark.slow
def test_peak_rss_constant_in_number_of_experts(tmp_path):
    dirs = []
    for i in range(8):
        g = torch.Generator().manual_seed(i)
        state = {"embedding.word_embeddings.weight": torch.randn(ROWS, COLS, generator=g),
                 "decoder.layers.mlp.linear_fc1.weight": torch.randn(4, ROWS // 4, COLS, generator=g),
                 "output_layer.weight": torch.randn(ROWS, COLS, generator=g)}
        dirs.append(write_checkpoint(tmp_path / f"e{i}", state))
    few = peak_rss_mib(tmp_path / "out2", dirs[:2])
    many = peak_rss_mib(tmp_path / "out8", dirs)
    # holding every expert's tensor would add 6 × 8 MiB; the streaming loop adds none
    print(f"peak RSS: 2 experts {few:.1f} MiB, 8 experts {many:.1f} MiB")
    assert many - few < TENSOR_MIB, (few, many)
