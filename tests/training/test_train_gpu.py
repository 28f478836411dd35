"""CUDA checks (pytest -m gpu; tools/gpu_check.sh runs them on a lent GPU machine)."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import train_gpu_workers as gpu_workers  # noqa: E402
import train_workers as workers  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("cuda")
    workers.mp_workers.spawn(gpu_workers.resume_worker, 1, str(work), str(work / "r.json"))
    return json.loads((work / "r.json").read_text())


def test_bf16_training_on_cuda_resumes_bitwise(cuda_run):
    c = cuda_run["choices"]
    assert c["device"].startswith("cuda") and c["backend"] == "nccl" and c["dtype"] == "bf16"
    assert len(cuda_run["full"]) == 4
    assert cuda_run["resumed"] == cuda_run["full"]
    assert cuda_run["full"][-1] < cuda_run["full"][0]


def test_load_expert_scores_on_cuda(cuda_run):
    assert cuda_run["expert_device"].startswith("cuda")
    assert cuda_run["ll_max_err"] < 1e-4  # token_ll (fused op) vs log_softmax of the logits
    assert cuda_run["ll_mean"] < 0


def test_local_checkpoint_loads_into_transformer_engine_and_back(tmp_path):
    from megatron_btm.megatron.specs import have_transformer_engine
    if not have_transformer_engine():
        pytest.skip("Transformer Engine is not installed")
    workers.mp_workers.spawn(gpu_workers.te_cross_spec_worker, 1, str(tmp_path), str(tmp_path / "r.json"))
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["te_has_extra"]
    assert out["local_vs_te"] < 1e-3  # TE and local kernels, same weights
    assert out["local_vs_back"] == 0.0
