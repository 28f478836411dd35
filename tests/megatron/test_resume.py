"""Kill -9 a training run after a checkpoint; the resumed run's losses equal an uninterrupted run's."""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import killrun  # noqa: E402

WORKER = Path(__file__).with_name("mp_workers.py")
STEPS, SAVE_EVERY = 8, 3


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    killrun.check_sigkill_resume(tmp_path, lambda out: [WORKER, out, STEPS, SAVE_EVERY, "0.1"],
                                 steps=STEPS, kill_after=3)
