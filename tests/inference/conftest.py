"""Shared fixtures: a world-1 gloo group, three pico experts, data sampled from each, a forest.

The experts are random-init pico GPTs with a large init std (peaked, clearly different
next-token distributions). Domain "dom<j>" is text *sampled from expert j*, so expert j is by
construction the best model of dom<j> — which is what the cached-prior test relies on — without
spending CPU time on training.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # inference_helpers.py

from inference_helpers import SEQ, TinyWorld  # noqa: E402


def _tokenizer(tmp: Path, corpora: Path) -> Path:
    """A byte-level BPE with ~300 ids trained on a few lines of text (fixture corpus)."""
    from megatron_btm.data.tokenizer import train_bpe
    src = tmp / "text.jsonl"
    lines = []
    for domain in ("novels", "code_python"):
        path = corpora / domain / "train.jsonl"
        if path.is_file():
            with open(path) as f:
                lines += [next(f) for _ in range(20)]
    if not lines:  # corpora absent: any text works for a tokenizer the models never read
        lines = ['{"text": "the quick brown fox jumps over the lazy dog %d"}\n' % i for i in range(200)]
    src.write_text("".join(lines))
    out = tmp / "tokenizer.json"
    train_bpe([src], 300, out)
    return out


def _sample_docs(model, vocab: int, n: int, length: int, seed: int) -> list[list[int]]:
    """n documents of `length` ids: a random first id, then ids sampled from the model."""
    from inference_helpers import forward_logprobs
    g = torch.Generator().manual_seed(seed)
    ids_BT = torch.randint(0, vocab, (n, 1), generator=g)
    while ids_BT.shape[1] < length:
        lp_BV = forward_logprobs(model, ids_BT[:, -SEQ:], vocab)[:, -1]
        nxt = torch.multinomial(lp_BV.exp(), 1, generator=g)
        ids_BT = torch.cat([ids_BT, nxt], dim=1)
    return ids_BT.tolist()


def _write_split(prefix: Path, docs: list[list[int]]) -> None:
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    import numpy as np
    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(400))
    for doc in docs:
        builder.add_document(torch.tensor(np.array(doc, dtype=np.int64)), [len(doc)])
    builder.finalize(f"{prefix}.idx")


@pytest.fixture(scope="session")
def world(tmp_path_factory, corpora_root) -> TinyWorld:
    from megatron_btm.data.tokenizer import load_tokenizer
    from megatron_btm.forest import Forest
    from megatron_btm.megatron.checkpoint import save_checkpoint
    from megatron_btm.megatron.parallel import init_distributed
    from inference_helpers import build_pico, pico_config
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("inference")
    init_distributed(init_method=f"file://{tmp}/pg", rank=0, world_size=1)
    tok_path = _tokenizer(tmp, corpora_root)
    vocab = load_tokenizer(tok_path).vocab_size
    data = tmp / "data"
    data.mkdir()
    (data / "tokenizer.json").write_text(tok_path.read_text())
    ckpts, models = [], []
    for j, seed in enumerate((11, 22, 33)):
        cfg = pico_config(vocab, seed)
        model = build_pico(cfg)
        models.append(model)
        ckpts.append(save_checkpoint(tmp / f"ckpt{j}", step=0, model_chunks=[model],
                                     meta={"model_config": cfg.to_dict()}))
        docs = _sample_docs(model, vocab, 36, 2 * SEQ + 1, seed=100 + j)
        _write_split(data / f"dom{j}" / "valid", docs[:24])
        _write_split(data / f"dom{j}" / "test", docs[24:])
    forest_root = tmp / "forest"
    forest = Forest.create(forest_root, seed_checkpoint=ckpts[0], seed_meta={"model_config": {}})
    for j, ck in enumerate(ckpts):
        forest.add_expert(f"e{j}", domain=f"dom{j}", checkpoint_dir=ck, parents=[("seed", 1.0)],
                          cycle=1, steps=0, tokens=0, config={})
    return TinyWorld(root=tmp, tokenizer=tok_path, vocab=vocab, data=data, forest=forest_root,
                     checkpoints=ckpts, models=models)
