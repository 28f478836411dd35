"""run_state is saved once, from rank 0, for every rank: per-rank timers must not make the ranks'
common state differ (Megatron warns "Rank 1 common state dict differs from rank 0 ..." at each
save). device_seconds is the slowest rank's on every rank."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import train_workers as workers  # noqa: E402

pytestmark = pytest.mark.slow  # two gloo ranks, two checkpoints: ~10 s idle, minutes under load


def test_two_rank_save_has_one_common_state_and_the_slowest_ranks_device_seconds(tmp_path):
    result = tmp_path / "result"
    workers.mp_workers.spawn(workers.run_state_worker, 2, str(tmp_path / "run"), str(result))
    ranks = [json.loads((tmp_path / f"result.{r}").read_text()) for r in (0, 1)]
    assert [r["common_state_warnings"] for r in ranks] == [[], []]
    assert ranks[0]["device_seconds"] == ranks[1]["device_seconds"] > 0
    # the saved one (rank 0's common state, also in meta.json) is what every rank holds
    meta = json.loads((tmp_path / "run" / "checkpoints" / "iter_0000002" / "meta.json").read_text())
    assert meta["device_seconds"] == ranks[1]["device_seconds"]
