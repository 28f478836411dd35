"""The torch-free import writer (hf.torchfree) writes the checkpoint the torch writer writes:
every file byte-identical (meta.json but its creation time; .metadata as DCP objects, whose
pickle bytes depend on whether DCP's classes are imported), and `btm import-hf` on that path
does not import torch."""
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_helpers import FAMILIES, hf_logits, megatron_logits, megatron_model, save_hf_model, tokens
from test_mixtral import save_tiny_mixtral

from megatron_btm.hf import importer
from megatron_btm.hf.importer import import_hf

ROOT = Path(__file__).resolve().parents[2]


def _files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def _import_both(monkeypatch, hf, tmp_path, **kwargs):
    """(torch-free, torch) checkpoints of `hf`; the first must not touch the torch writer."""
    with monkeypatch.context() as m:
        m.setattr(importer, "_write_with_torch", lambda *a, **k: pytest.fail("took the torch writer"))
        free = import_hf(hf, tmp_path / "free", **kwargs)
    return free, import_hf(hf, tmp_path / "torch", torch_free=False, **kwargs)


def _assert_same_checkpoint(free: Path, with_torch: Path) -> None:
    import torch.distributed.checkpoint.filesystem  # noqa: F401 (DCP's classes, to unpickle)
    a, b = _files(free), _files(with_torch)
    assert a.keys() == b.keys() and "iter_0000000/__0_0.distcp" in a
    for name in a:
        if name.endswith("meta.json"):
            ma, mb = (json.loads(p.read_text()) for p in (a[name], b[name]))
            assert {**ma, "created": None} == {**mb, "created": None}
        elif name.endswith(".metadata"):
            md = pickle.loads(a[name].read_bytes())
            assert md == pickle.loads(b[name].read_bytes())
            assert {type(v).__name__ for v in md.state_dict_metadata.values()} == \
                {"TensorStorageMetadata", "BytesStorageMetadata"}
        else:
            assert a[name].read_bytes() == b[name].read_bytes(), name


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_same_checkpoint_as_torch_and_logits(gloo_world, monkeypatch, tmp_path, family):
    hf_model = save_hf_model(family, tmp_path / "hf", max_shard_size="100KB")  # sharded
    free, with_torch = _import_both(monkeypatch, tmp_path / "hf", tmp_path)
    _assert_same_checkpoint(free, with_torch)
    model, _ = megatron_model(free)  # the project's loader (dist_checkpointing.load)
    ids = tokens()
    ours = megatron_logits(model, ids)[..., :hf_model.config.vocab_size]
    torch.testing.assert_close(ours, hf_logits(hf_model, ids), rtol=0, atol=1e-4)


def test_mixtral_experts(monkeypatch, tmp_path):
    save_tiny_mixtral(tmp_path / "hf")
    _assert_same_checkpoint(*_import_both(monkeypatch, tmp_path / "hf", tmp_path))


@pytest.mark.parametrize("family,stream", [("gpt2", True), ("llama", True), ("llama", False)])
def test_padded_vocabulary_and_tables_in_row_slices(monkeypatch, tmp_path, family, stream):
    """A vocabulary of 1001 at --tp 2 pads to 1024 zero rows; tables above STREAM_BYTES go in
    row slices (chunks), the padding rows last."""
    config_cls, model_cls, kwargs = FAMILIES[family]
    monkeypatch.setitem(FAMILIES, family, (config_cls, model_cls, dict(kwargs, vocab_size=1001)))
    if stream:
        monkeypatch.setattr(importer, "STREAM_BYTES", 40_000)  # ~156 rows of 64 fp32
    save_hf_model(family, tmp_path / "hf")
    free, with_torch = _import_both(monkeypatch, tmp_path / "hf", tmp_path, tp=2)
    _assert_same_checkpoint(free, with_torch)
    from megatron_btm.averaging.torch_dist import TorchDistReader
    reader = TorchDistReader(free / "iter_0000000")
    table = reader.tensors()["embedding.word_embeddings.weight"]
    assert list(table.size) == [1024, 64] and (len(table.chunks) > 2) == stream
    assert not reader.read_tensor("embedding.word_embeddings.weight")[1001:].any()


def test_bf16_kept_and_dtype_changes_go_through_torch(monkeypatch, tmp_path):
    from hf_helpers import make_hf_model

    from megatron_btm.hf import torchfree
    make_hf_model("qwen3").to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    _assert_same_checkpoint(*_import_both(monkeypatch, tmp_path / "hf", tmp_path))

    def took_torch_free(*args):
        raise RuntimeError("torch-free writer")
    monkeypatch.setattr(torchfree, "write_checkpoint", took_torch_free)
    out = import_hf(tmp_path / "hf", tmp_path / "fp32", dtype="fp32")  # a conversion: torch
    assert (out / "iter_0000000" / ".metadata").is_file()
    with pytest.raises(RuntimeError, match="torch-free writer"):  # kept as stored
        import_hf(tmp_path / "hf", tmp_path / "bf16", dtype="bf16")


def test_cli_does_not_import_torch(tmp_path):
    """`btm import-hf` of a safetensors folder in a fresh interpreter: torch is imported by
    nothing but megatron/model.py (GPTConfig's module), and by nothing once that is torch-free."""
    save_hf_model("llama", tmp_path / "hf")
    spy = (
        "import json, sys, traceback\n"
        "class Spy:\n"
        "    who = None\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' and Spy.who is None:\n"
        "            Spy.who = [f.filename for f in traceback.extract_stack()\n"
        "                       if 'megatron_btm' in f.filename]\n"
        "sys.meta_path.insert(0, Spy())\n"
        "{body}\n"
        "print(json.dumps({{'rc': rc, 'who': Spy.who, 'torch': 'torch' in sys.modules}}))\n")
    run = lambda body: json.loads(subprocess.run(  # noqa: E731
        [sys.executable, "-c", spy.format(body=body)], cwd=ROOT, check=True, capture_output=True,
        text=True).stdout.strip().splitlines()[-1])
    cli = run("from megatron_btm.cli import main\n"
              f"rc = main(['import-hf', {str(tmp_path / 'hf')!r}, '--output', {str(tmp_path / 'out')!r}])")
    assert cli["rc"] == 0 and (tmp_path / "out" / "iter_0000000" / "__0_0.distcp").is_file()
    config = run("import megatron_btm.megatron.model\nrc = 0")
    if config["torch"]:  # GPTConfig's module imports torch at its top: the only importer allowed
        assert cli["who"] and cli["who"][-1].endswith("megatron_btm/megatron/model.py"), cli["who"]
    else:
        assert not cli["torch"], cli["who"]
