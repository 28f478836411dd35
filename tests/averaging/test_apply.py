"""average_checkpoints on small DCP (torch_dist-format) checkpoints: values, checks, atomicity."""
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from averaging_helpers import read_all, tiny_state, write_checkpoint

from megatron_btm.averaging.apply import average_checkpoints
from megatron_btm.utils.io import sha256_tree

REPO = Path(__file__).resolve().parents[2]
MODEL_KEYS = ["embedding.word_embeddings.weight", "decoder.layers.self_attention.linear_qkv.weight",
              "decoder.final_layernorm.weight", "output_layer.weight"]


@pytest.fixture
def experts(tmp_path):
    return [write_checkpoint(tmp_path / f"e{i}", tiny_state(i)) for i in range(3)]


def test_average_matches_float64_reference(experts, tmp_path):
    w = [0.2, 0.3, 0.5]
    summary = average_checkpoints(experts, w, tmp_path / "out", progress=False)
    got = read_all(tmp_path / "out")
    assert sorted(got) == sorted(MODEL_KEYS)  # optimizer state is not carried
    sources = [read_all(e) for e in experts]
    for key in MODEL_KEYS:
        ref = sum(wi * s[key].double() for wi, s in zip(w, sources))
        torch.testing.assert_close(got[key].double(), ref, rtol=1e-6, atol=1e-6)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["weights_only"] is True and meta["averaging"]["weights"] == w
    assert meta["averaging"]["sources"] == [str(e.resolve()) for e in experts]
    assert meta["model_config"]["hidden_size"] == 8
    assert summary["num_tensors"] == 4 and summary["bytes_read"] > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_hot_weights_give_that_expert_bit_for_bit(tmp_path, dtype):
    experts = [write_checkpoint(tmp_path / f"e{i}", tiny_state(i, dtype=dtype)) for i in range(3)]
    average_checkpoints(experts, [0.0, 1.0, 0.0], tmp_path / "out", progress=False)
    got, want = read_all(tmp_path / "out"), read_all(experts[1])
    for key in MODEL_KEYS:
        assert got[key].dtype == dtype and torch.equal(got[key], want[key]), key


def test_sharded_objects_copied_when_identical_refused_when_different(tmp_path):
    key = "decoder.layers.self_attention.linear_proj._extra_state/shard_0_1"
    def state(i, payload):
        s = tiny_state(i)
        s[key] = io.BytesIO(payload)
        return s
    a = write_checkpoint(tmp_path / "a", state(0, b"same"))
    b = write_checkpoint(tmp_path / "b", state(1, b"same"))
    c = write_checkpoint(tmp_path / "c", state(2, b"different"))
    summary = average_checkpoints([a, b], [0.5, 0.5], tmp_path / "out", progress=False)
    assert summary["num_objects"] == 1
    from megatron_btm.averaging.torch_dist import TorchDistReader
    assert TorchDistReader(tmp_path / "out").read_object_bytes(key) == TorchDistReader(a).read_object_bytes(key)
    with pytest.raises(ValueError, match=f"object '{key}' differs"):
        average_checkpoints([a, c], [0.5, 0.5], tmp_path / "out2", progress=False)


def _assert_refused(tmp_path, dirs, match, exc=ValueError, weights=None):
    out = tmp_path / "refused"
    with pytest.raises(exc, match=match):
        average_checkpoints(dirs, weights or [1 / len(dirs)] * len(dirs), out, progress=False)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_architecture_mismatch_names_field(tmp_path, experts):
    other = write_checkpoint(tmp_path / "wide", tiny_state(5), model_config={"num_attention_heads": 4})
    _assert_refused(tmp_path, [experts[0], other], r"architecture mismatch: model_config.num_attention_heads=2 .* but 4")


def test_init_seed_difference_is_not_an_architecture_mismatch(tmp_path, experts):
    other = write_checkpoint(tmp_path / "s", tiny_state(5), model_config={"init_seed": 99})
    average_checkpoints([experts[0], other], [0.5, 0.5], tmp_path / "out", progress=False)


def test_vocab_mismatch_from_meta_and_from_tensor_shapes(tmp_path, experts):
    other = write_checkpoint(tmp_path / "v", tiny_state(5, vocab=32), model_config={"vocab_size": 32})
    _assert_refused(tmp_path, [experts[0], other], r"vocab mismatch: model_config.vocab_size=16 .* but 32")
    for e in (experts[0], other):  # without meta.json the tensor shapes still tell
        (e / "meta.json").unlink()
    _assert_refused(tmp_path, [experts[0], other],
                    r"vocab mismatch: tensor 'embedding.word_embeddings.weight' has shape \[16, 8\] .* but \[32, 8\]")


def test_shape_mismatch_names_first_tensor_and_both_shapes(tmp_path, experts):
    other = write_checkpoint(tmp_path / "h", tiny_state(5, hidden=4))
    _assert_refused(tmp_path, [experts[0], other], r"shape mismatch: tensor 'embedding.word_embeddings.weight' "
                                                   r"has shape \[16, 8\] in .* but \[16, 4\] in")


def test_key_set_mismatch_names_tensor(tmp_path, experts):
    other = write_checkpoint(tmp_path / "k", tiny_state(5, extra_key="decoder.layers.extra.bias"))
    _assert_refused(tmp_path, [experts[0], other], r"tensor 'decoder.layers.extra.bias' is in .*/k but not in .*/e0")


def test_dtype_mismatch(tmp_path, experts):
    other = write_checkpoint(tmp_path / "b", tiny_state(5, dtype=torch.bfloat16))
    _assert_refused(tmp_path, [experts[0], other], "dtype mismatch: tensor 'embedding.word_embeddings.weight'")


def test_missing_file_and_folder(tmp_path, experts):
    distcp = sorted(experts[1].glob("*.distcp"))[0]
    distcp.unlink()
    _assert_refused(tmp_path, experts[:2], rf"{distcp.name}: file not found", FileNotFoundError)
    (experts[2] / ".metadata").unlink()
    _assert_refused(tmp_path, [experts[0], experts[2]], r"\.metadata: file not found", FileNotFoundError)
    _assert_refused(tmp_path, [experts[0], tmp_path / "nope"], "nope: checkpoint folder not found", FileNotFoundError)


def test_weights_checked(tmp_path, experts):
    _assert_refused(tmp_path, experts, "weights: 2 values for 3 checkpoints", weights=[0.5, 0.5])
    _assert_refused(tmp_path, experts, r"weights\[0\]=-1.0", weights=[-1, 1, 1])
    with pytest.warns(UserWarning, match="not 1: normalising"):
        summary = average_checkpoints(experts, [1, 1, 2], tmp_path / "out", progress=False)
    assert summary["weights"] == [0.25, 0.25, 0.5]


def test_existing_output_refused_unless_overwrite(tmp_path, experts):
    average_checkpoints(experts, [1, 0, 0], tmp_path / "out", progress=False)
    with pytest.raises(FileExistsError, match="already exists"):
        average_checkpoints(experts, [0, 1, 0], tmp_path / "out", progress=False)
    average_checkpoints(experts, [0, 1, 0], tmp_path / "out", progress=False, overwrite=True)
    assert torch.equal(read_all(tmp_path / "out")["output_layer.weight"], read_all(experts[1])["output_layer.weight"])


KILL_SCRIPT = """
import sys, time
from pathlib import Path
from megatron_btm.averaging import torch_dist
from megatron_btm.averaging.apply import average_checkpoints
orig = torch_dist.TorchDistWriter.write_chunk
def slow(self, *a, **k):
    orig(self, *a, **k)
    Path(sys.argv[1]).touch()   # tell the test we are in the middle of writing
    time.sleep(60)
torch_dist.TorchDistWriter.write_chunk = slow
average_checkpoints(sys.argv[3:], [0.5, 0.5], sys.argv[2], progress=False, overwrite=True)
"""


def test_sigkill_mid_average_leaves_output_as_before_and_rerun_completes(tmp_path, experts):
    out = tmp_path / "out"
    average_checkpoints(experts[:2], [1.0, 0.0], out, progress=False)  # an older output exists
    before = sha256_tree(out)
    marker = tmp_path / "writing"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(marker), str(out), *map(str, experts[:2])], env=env)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, "averaging subprocess exited before writing"
            assert time.monotonic() < deadline, "averaging subprocess never started writing"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert sha256_tree(out) == before  # the old output, untouched
    average_checkpoints(experts[:2], [0.5, 0.5], out, progress=False, overwrite=True)
    got, a, b = read_all(out), read_all(experts[0]), read_all(experts[1])
    for key in MODEL_KEYS:
        torch.testing.assert_close(got[key], 0.5 * a[key] + 0.5 * b[key])
