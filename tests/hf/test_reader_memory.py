"""The HF weight reader: safetensors read exactly (every dtype) and the import's peak memory does
not grow with the model (tensors are streamed, files are not memory-mapped)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_btm.hf.reader import SafetensorsFile

REPO = Path(__file__).resolve().parents[2]


def test_safetensors_reader_equals_the_library(tmp_path):
    from safetensors.torch import load_file, save_file
    g = torch.Generator().manual_seed(0)
    state = {"f32": torch.randn(3, 5, generator=g), "bf16": torch.randn(7, generator=g).bfloat16(),
             "f16": torch.randn(2, 2, generator=g).half(), "i64": torch.arange(6).reshape(2, 3),
             "bool": torch.tensor([True, False, True]), "empty": torch.zeros(0, 4)}
    save_file(state, str(tmp_path / "m.safetensors"))
    ref = load_file(str(tmp_path / "m.safetensors"))
    f = SafetensorsFile(tmp_path / "m.safetensors")
    assert sorted(f.keys()) == sorted(ref)
    for key, t in ref.items():
        got = f.get(key)
        assert got.dtype == t.dtype and f.shape(key) == tuple(t.shape) and torch.equal(got, t), key
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    with pytest.raises(ValueError, match=r"cut.safetensors: not a readable safetensors file \(tensor"):
        SafetensorsFile(tmp_path / "cut.safetensors")


LAUNCH = ("import subprocess, sys; "
          "sys.exit(subprocess.run([sys.executable, '-c', sys.argv[1], *sys.argv[2:]]).returncode)")
IMPORT = """
import json, resource, sys
from megatron_btm.hf.importer import import_hf
import_hf(sys.argv[1], sys.argv[2])
print(json.dumps({"maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
HIDDEN, FFN = 512, 2048
LAYER_MIB = (2 * HIDDEN * HIDDEN + 2 * HIDDEN * HIDDEN // 2 + 3 * HIDDEN * FFN) * 4 / 2**20  # ~15 MiB


def _write_llama(folder: Path, layers: int) -> None:
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=1024, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    cfg.save_pretrained(folder)
    save_file({k: torch.randn(s, generator=g) for k, s in shapes.items()}, str(folder / "model.safetensors"))


def _peak_rss_mib(src: Path, out: Path) -> float:
    # a grandchild of a small interpreter: ru_maxrss does not carry pytest's RSS (see
    # tests/averaging/test_memory.py). A fixed mmap threshold: glibc's dynamic one keeps freed
    # multi-MiB tensors on the heap for reuse, which shows as noise of a layer or two (measured
    # here: 2 / 8 / 16 layers 371 / 374 / 405 MiB dynamic, 371 / 372 / 370 MiB fixed).
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="1048576")
    proc = subprocess.run([sys.executable, "-c", LAUNCH, IMPORT, str(src), str(out)], env=env,
                          capture_output=True, text=True, check=True, timeout=300)
    return json.loads(proc.stdout.strip().splitlines()[-1])["maxrss_mib"]


@pytest.mark.slow
def test_import_peak_memory_does_not_grow_with_the_number_of_layers(tmp_path):
    for layers in (2, 8):
        _write_llama(tmp_path / f"hf{layers}", layers)
    few = _peak_rss_mib(tmp_path / "hf2", tmp_path / "out2")
    many = _peak_rss_mib(tmp_path / "hf8", tmp_path / "out8")
    print(f"import peak RSS: 2 layers {few:.1f} MiB, 8 layers {many:.1f} MiB (a layer: {LAYER_MIB:.1f} MiB)")
    # reading (or mapping) the whole model would add 6 layers, ~90 MiB; streaming adds none
    assert many - few < LAYER_MIB, (few, many)
