"""Small torch_dist checkpoints for the averaging tests, written with plain DCP (no Megatron)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

MODEL_CONFIG = {"num_layers": 2, "hidden_size": 8, "num_attention_heads": 2, "ffn_hidden_size": None,
                "seq_length": 4, "vocab_size": 16, "hidden_dropout": 0.0, "attention_dropout": 0.0,
                "init_method_std": 0.02, "init_seed": 1, "tie_embeddings": False,
                "make_vocab_size_divisible_by": 16}


def tiny_state(seed: int, *, vocab: int = 16, hidden: int = 8, dtype=torch.float32, extra_key=None):
    g = torch.Generator().manual_seed(seed)
    state = {
        "embedding.word_embeddings.weight": torch.randn(vocab, hidden, generator=g),
        "decoder.layers.self_attention.linear_qkv.weight": torch.randn(2, 3 * hidden, hidden, generator=g),
        "decoder.final_layernorm.weight": torch.randn(hidden, generator=g),
        "output_layer.weight": torch.randn(vocab, hidden, generator=g),
        # not model state: must be ignored by averaging
        "optimizer.state.exp_avg.decoder.final_layernorm.weight": torch.randn(hidden, generator=g),
    }
    if extra_key:
        state[extra_key] = torch.randn(3, generator=g)
    return {k: v.to(dtype) for k, v in state.items()}


def write_checkpoint(path: Path, state: dict, *, model_config: dict | None = None) -> Path:
    """A torch_dist-format folder: DCP files + Megatron metadata.json + our meta.json."""
    path.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": yes
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.save(state, storage_writer=FileSystemWriter(str(path)), no_dist=True)
    (path / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                    "common_backend": "torch", "common_backend_version": 1}))
    torch.save({}, path / "common.pt")
    cfg = dict(MODEL_CONFIG, **(model_config or {}))
    (path / "meta.json").write_text(json.dumps({"format": "torch_dist", "model_config": cfg,
                                                "parallel": {"tp": 1, "pp": 1}, "weights_only": False}))
    return path


def read_all(path: Path) -> dict:
    """Independent reader: plain dcp.load of every tensor the metadata lists."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    md = FileSystemReader(str(path)).read_metadata()
    out = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in md.state_dict_metadata.items()
           if isinstance(v, TensorStorageMetadata)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load(out, storage_reader=FileSystemReader(str(path)), no_dist=True)
    return out
