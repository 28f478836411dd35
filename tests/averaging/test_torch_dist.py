"""TorchDistReader / TorchDistWriter against DCP's own load path."""
import json

import pytest
import torch
from averaging_helpers import read_all, tiny_state, write_checkpoint

from megatron_btm.averaging import dcp_metadata, dcp_records, torch_dist
from megatron_btm.averaging.torch_dist import TorchDistReader, TorchDistWriter


@pytest.fixture
def fast_path_calls(monkeypatch):
    """Record whether each chunk took the direct-read path (True) or the torch.load fallback."""
    calls = []
    orig = torch_dist.read_record_into
    def spy(*a, **k):
        calls.append(orig(*a, **k))
        return calls[-1]
    monkeypatch.setattr(torch_dist, "read_record_into", spy)
    return calls


def test_reader_fast_path_equals_dcp_load(tmp_path, fast_path_calls):
    ck = write_checkpoint(tmp_path / "c", tiny_state(0, dtype=torch.bfloat16))
    r = TorchDistReader(ck)
    ref = read_all(ck)
    for key in r.tensors():
        fast, dcp_path = r.read_tensor(key), r.read_tensor_dcp(key)
        assert torch.equal(fast, ref[key]) and torch.equal(dcp_path, ref[key]), key
    r.close()
    assert fast_path_calls and all(fast_path_calls)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_writer_chunks_roundtrip_through_dcp(tmp_path, dtype, fast_path_calls):
    g = torch.Generator().manual_seed(0)
    full = {"a": torch.randn(4, 6, 5, generator=g).to(dtype), "b": torch.randn(7, 6, generator=g).to(dtype)}
    w = TorchDistWriter(tmp_path / "c")
    w.declare_tensor("a", full["a"].shape, dtype)
    for i in range(4):  # leading-axis chunks (Megatron's stacked layers): contiguous targets
        w.write_chunk("a", (i, 0, 0), full["a"][i : i + 1])
    w.declare_tensor("b", full["b"].shape, dtype)
    w.write_chunk("b", (0, 0), full["b"][:, :2])  # column chunks (TP-like): non-contiguous targets
    w.write_chunk("b", (0, 2), full["b"][:, 2:])
    w.write_object_bytes("obj/shard_0_1", b"\x00payload")
    w.finish({"model": {"x": 1}})
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [".metadata", "__0_0.distcp", "common.pt", "metadata.json"]
    assert json.loads((tmp_path / "c" / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    ref = read_all(tmp_path / "c")  # plain DCP load, independent of our reader
    r = TorchDistReader(tmp_path / "c")
    for key in full:
        assert torch.equal(ref[key], full[key]) and torch.equal(r.read_tensor(key), full[key]), key
    assert fast_path_calls.count(True) == 4 and fast_path_calls.count(False) == 2  # b's columns: fallback
    assert r.read_object_bytes("obj/shard_0_1") == b"\x00payload"
    assert r.read_common() == {"model": {"x": 1}}
    # a chunk written from a view must hold only the chunk, not the view's whole storage
    assert (tmp_path / "c" / "__0_0.distcp").stat().st_size < 3 * full["a"].numel() * full["a"].element_size() + 20000


def test_incomplete_tensor_and_bad_backend(tmp_path):
    w = TorchDistWriter(tmp_path / "c")
    w.declare_tensor("a", torch.Size([4, 2]), torch.float32)
    w.write_chunk("a", (0, 0), torch.zeros(2, 2))
    with pytest.raises(AssertionError, match="chunks cover 4 of 8"):
        w.finish()
    ck = write_checkpoint(tmp_path / "d", tiny_state(0))
    (ck / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr"}))
    with pytest.raises(ValueError, match="sharded_backend='zarr'"):
        TorchDistReader(ck)
    (ck / "metadata.json").unlink()
    with pytest.raises(FileNotFoundError, match="metadata.json: file not found"):
        TorchDistReader(ck)


def test_record_layout_cache_rejects_lookalike_with_other_strides(tmp_path):
    """A record of the same shape and length but transposed strides must not take the cached
    direct-read layout of an earlier contiguous record."""
    a = torch.arange(30, dtype=torch.float32).reshape(6, 5)
    b = torch.arange(100, 130, dtype=torch.float32).reshape(5, 6).T  # [6, 5], strides (1, 6)
    path = tmp_path / "records.bin"
    with open(path, "wb") as f:
        spans = []
        for t in (a, a + 1, b):
            start = f.tell()
            torch.save(t, f)
            spans.append((start, f.tell() - start))
    assert spans[0][1] == spans[2][1]  # same length: only the head (strides in data.pkl) differs
    layouts, out = {}, torch.empty(6, 5)
    with open(path, "rb", buffering=0) as f:
        assert dcp_records.read_record_into(f, *spans[0], out, layouts) and torch.equal(out, a)
        assert len(layouts) == 1
        assert dcp_records.read_record_into(f, *spans[1], out, layouts) and torch.equal(out, a + 1)  # cached layout
        assert not dcp_records.read_record_into(f, *spans[2], out, layouts)  # falls back to torch.load


def test_light_metadata_matches_dcp_and_falls_back(tmp_path, monkeypatch):
    """The stand-in unpickler reads the same sizes, dtypes, chunks and storage as DCP's own
    classes; a .metadata it cannot read goes through DCP's unpickler instead."""
    import pickle

    import torch.distributed.checkpoint.filesystem  # noqa: F401 (DCP's classes, for the reference)
    ck = write_checkpoint(tmp_path / "c", tiny_state(0, dtype=torch.bfloat16))
    real = pickle.loads((ck / ".metadata").read_bytes())
    light = dcp_metadata.read_metadata(ck)
    assert type(light).__module__ == dcp_metadata.__name__  # the stand-ins were used
    tensors = {k: v for k, v in real.state_dict_metadata.items() if type(v).__name__ == "TensorStorageMetadata"}
    assert tensors and set(TorchDistReader(ck).tensors()) == set(tensors)
    for key, md in tensors.items():
        got = light.state_dict_metadata[key]
        assert got.size == md.size and got.properties.dtype == md.properties.dtype == torch.bfloat16
        assert [(c.offsets, c.sizes) for c in got.chunks] == [(c.offsets, c.sizes) for c in md.chunks]
    def as_tuples(m):
        return sorted((i.fqn, str(i.offset), s.relative_path, s.offset, s.length) for i, s in m.storage_data.items())
    assert as_tuples(light) == as_tuples(real)

    def refuse(*a, **k):
        raise pickle.UnpicklingError("layout not covered")
    monkeypatch.setattr(dcp_metadata.LightUnpickler, "load", refuse)
    fallback = dcp_metadata.read_metadata(ck)
    assert type(fallback).__module__.startswith("torch.distributed.checkpoint")
    r = TorchDistReader(ck)
    assert all(torch.equal(r.read_tensor(k), r.read_tensor_dcp(k)) for k in tensors)


def test_reading_does_not_import_dcp(tmp_path):
    """Start-up cost: reading a checkpoint must not import torch.distributed.checkpoint."""
    import subprocess
    import sys
    ck = write_checkpoint(tmp_path / "c", tiny_state(0))
    code = ("import sys; from megatron_btm.averaging.torch_dist import TorchDistReader as R; r = R(sys.argv[1]); "
            "[r.read_tensor(k) for k in r.tensors()]; "
            "print('torch.distributed.checkpoint' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(ck)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_metadata_written_without_dcp_equals_dcps_own(tmp_path):
    """The .metadata pickled under DCP's class names (no DCP import) loads into exactly the
    Metadata that DCP's own classes build."""
    import pickle

    import torch.distributed.checkpoint.filesystem  # noqa: F401 (DCP's classes, to compare)
    w = TorchDistWriter(tmp_path / "c")
    w.declare_tensor("a", torch.Size([4, 3]), torch.bfloat16)
    w.write_chunk("a", (0, 0), torch.ones(2, 3, dtype=torch.bfloat16))
    w.write_chunk("a", (2, 0), torch.zeros(2, 3, dtype=torch.bfloat16))
    w.declare_tensor("b", torch.Size([5]), torch.float32)
    w.write_chunk("b", (0,), torch.arange(5.0))
    w.write_object_bytes("obj/shard_0_1", b"raw")
    raw = dcp_metadata.dump_metadata(w._tensors, w._objects, w._storage, "ck", "save-1")
    got = pickle.loads(raw)
    want = w._dcp_metadata("save-1")
    want.storage_meta.checkpoint_id = "ck"
    assert type(got) is type(want) and got == want
    assert {type(v).__name__ for v in got.state_dict_metadata.values()} == {"TensorStorageMetadata",
                                                                           "BytesStorageMetadata"}
    assert got.state_dict_metadata["a"].properties.memory_format == torch.contiguous_format
    w.abort()


def test_average_in_a_fresh_process_never_imports_dcp(tmp_path):
    """Start-up cost: `btm average` reads and writes torch_dist without importing
    torch.distributed.checkpoint, and DCP loads what it wrote."""
    import subprocess
    import sys
    a = write_checkpoint(tmp_path / "a", tiny_state(0))
    b = write_checkpoint(tmp_path / "b", tiny_state(1))
    code = ("import sys; from megatron_btm.averaging.apply import average_checkpoints as avg; "
            "avg(sys.argv[1:3], [0.5, 0.5], sys.argv[3], progress=False); "
            "print('torch.distributed.checkpoint' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(a), str(b), str(tmp_path / "out")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
    got, ra, rb = read_all(tmp_path / "out"), read_all(a), read_all(b)
    assert got and all(torch.allclose(got[k], (ra[k].float() + rb[k].float()).div(2).to(ra[k].dtype))
                       for k in got if k in ra)
