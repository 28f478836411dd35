"""Averaging real Megatron torch_dist checkpoints: TP=2 with TP=1, loaded back at TP/PP.

One spawn of 2 gloo processes does everything (Megatron's import dominates the cost):
save expert A at TP=2 and expert B at TP=1 (DP=2); rank 0 averages (0.25, 0.75) and one-hot
(0, 1); then at TP=2, TP=1 and PP=2 each rank loads A, B and the averages with Megatron's own
`dist_checkpointing.load` and checks its shard: avg == 0.25·A + 0.75·B (float64 reference
from Megatron-loaded A and B, independent of our reader/writer), one-hot == B bit for bit.
"""
import traceback

import pytest
import torch

pytestmark = [pytest.mark.distributed]


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _worker(rank, world, root, errors):
    try:
        from megatron_btm.averaging.apply import average_checkpoints
        from megatron_btm.megatron.checkpoint import load_weights, save_checkpoint
        from megatron_btm.megatron.model import GPTConfig, build_model
        from megatron_btm.megatron.parallel import ParallelConfig, init_distributed, seed_all, setup_model_parallel
        torch.set_num_threads(1)
        init_distributed(init_method=f"file://{root}/pg", rank=rank, world_size=world)
        cfg = GPTConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=100,
                        tie_embeddings=False, make_vocab_size_divisible_by=64)

        def build(tp, pp, seed):
            setup_model_parallel(ParallelConfig(tp=tp, pp=pp))
            seed_all(seed)
            return build_model(cfg, tp=tp, pp=pp)

        meta = {"model_config": cfg.to_dict()}
        ck_a = save_checkpoint(f"{root}/a", step=1, model_chunks=[build(2, 1, 1)], meta=meta)
        ck_b = save_checkpoint(f"{root}/b", step=1, model_chunks=[build(1, 1, 2)], meta=meta)
        if rank == 0:
            from megatron_btm.averaging.torch_dist import TorchDistReader
            for ck in (ck_a, ck_b):  # TP=2 column/row shards and per-layer chunks: both read paths agree
                reader = TorchDistReader(ck)
                for key in reader.tensors():
                    assert torch.equal(reader.read_tensor(key), reader.read_tensor_dcp(key)), (ck, key)
            average_checkpoints([ck_a, ck_b], [0.25, 0.75], f"{root}/avg", progress=False,
                                meta_extra={"method": "weighted"})
            average_checkpoints([ck_a, ck_b], [0.0, 1.0], f"{root}/onehot", progress=False)
        torch.distributed.barrier()

        for tp, pp in [(2, 1), (1, 1), (1, 2)]:
            loaded = {}
            for name in ("a", "b", "avg", "onehot"):
                model = build(tp, pp, 99)  # a different init: everything must come from the file
                path = {"a": ck_a, "b": ck_b}.get(name, f"{root}/{name}")
                load_weights([model], path)
                loaded[name] = _params(model)
            assert loaded["avg"], "no parameters loaded"
            # the two experts differ (different seeds), so the checks below are not vacuous
            assert sum(not torch.equal(loaded["a"][n], loaded["b"][n]) for n in loaded["a"]) >= 4
            for n, p in loaded["avg"].items():
                ref = 0.25 * loaded["a"][n].double() + 0.75 * loaded["b"][n].double()
                torch.testing.assert_close(p.double(), ref, rtol=1e-6, atol=1e-6, msg=f"{n} tp={tp} pp={pp}")
                assert torch.equal(loaded["onehot"][n], loaded["b"][n]), f"one-hot {n} tp={tp} pp={pp}"
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


def test_tp2_plus_tp1_average_loads_at_any_tp_pp(tmp_path):
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.spawn(_worker, args=(2, str(tmp_path), errors), nprocs=2, join=True)
    except Exception as e:
        msgs = []
        while not errors.empty():
            msgs.append(errors.get())
        pytest.fail("\n".join(msgs) or str(e))
    import json
    meta = json.loads((tmp_path / "avg" / "meta.json").read_text())
    assert meta["weights_only"] and meta["averaging"]["weights"] == [0.25, 0.75]
    assert meta["model_config"]["vocab_size"] == 100
