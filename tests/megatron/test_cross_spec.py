"""Checkpoints cross layer specs: local-spec weights load into a model with Transformer Engine's
`_extra_state` entries, and such a checkpoint loads back into the local spec (CPU, no TE)."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import mp_workers  # noqa: E402
import spec_workers  # noqa: E402


def test_local_checkpoint_loads_into_te_shaped_model_and_back(tmp_path):
    result = tmp_path / "result.json"
    mp_workers.spawn(spec_workers.cross_spec_worker, 1, str(tmp_path), str(result))
    out = json.loads(result.read_text())
    assert out["te_differs_before"]
    assert out["local_into_te"] is True, out["local_into_te"]
    assert out["te_kept_own_extra"]
    assert out["te_ckpt_has_extra"]
    assert out["te_into_te_extra"]  # a TE checkpoint's own extra state is what a TE model gets
    assert out["te_into_local"] is True
    # a tensor the checkpoint lacks that is not an extra state is an error naming it
    assert out["missing"].startswith("ValueError: ") and "'output_layer.weight'" in out["missing"]
    assert "different architecture" in out["missing"]
