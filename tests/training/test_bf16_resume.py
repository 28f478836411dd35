"""A bf16 run (Float16Module, fp32 main parameters in the optimizer) killed by SIGKILL resumes bitwise."""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "megatron"))
import killrun  # noqa: E402

WORKER = Path(__file__).with_name("train_workers.py")
STEPS, SAVE_EVERY = 8, 3


@pytest.mark.slow
def test_bf16_sigkill_then_resume_is_bitwise_identical(tmp_path):
    losses = killrun.check_sigkill_resume(
        tmp_path, lambda out: [WORKER, out, "bf16", STEPS, SAVE_EVERY], steps=STEPS, kill_after=3)
    assert losses[STEPS] < losses[1]  # it trains
