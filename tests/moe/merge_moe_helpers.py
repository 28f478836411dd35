"""Pico forests for the merge-moe tests (spawned workers: Megatron needs torch.distributed) and a
hand-written reference forward of a GPT-2 style model read straight from checkpoint tensors."""
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "megatron"))
import mp_workers  # noqa: E402,F401  (spawn)

PICO = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
        "vocab_size": 100, "hidden_dropout": 0.0, "attention_dropout": 0.0}
TOKENIZER = "c" * 64
IDS = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
MLP_SUFFIXES = ("linear_fc1.weight", "linear_fc1.bias", "linear_fc2.weight", "linear_fc2.bias")


def logits_of(model, ids):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    pos = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    model.eval()
    with torch.no_grad():
        return gather_from_tensor_model_parallel_region(model(ids, pos, None))


def _perturb(model, seed, mlp_only):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not mlp_only or (".mlp." in name and "layernorm" not in name):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def build_forests(rank, world, init_file, root, specs_json, result_file):
    """Forests from specs {forest: {"same": bool, "experts": {id: {"domain", "model": {...}}}}}:
    a seed and experts branched from it (`same`: only the MLP weights differ; else every
    weight). Writes {forest: {id: dense logits on IDS}} with torch.save."""
    torch.set_num_threads(1)
    from megatron_btm.forest import Forest
    from megatron_btm.megatron import parallel
    from megatron_btm.megatron.checkpoint import save_checkpoint
    from megatron_btm.megatron.model import GPTConfig, build_model
    parallel.init_distributed(init_method=f"file://{init_file}", rank=rank, world_size=world)
    parallel.setup_model_parallel(parallel.ParallelConfig())
    out = {}
    for fname, spec in json.loads(specs_json).items():
        tok = spec.get("tokenizer", TOKENIZER)
        base = GPTConfig(**dict(PICO, **spec.get("model", {})))
        parallel.seed_all(1)
        seed_model = build_model(base)
        meta = {"model_config": base.to_dict(), "tokenizer_sha256": tok}
        seed_ckpt = save_checkpoint(f"{root}/{fname}-runs/seed", step=0, model_chunks=[seed_model], meta=meta)
        forest = Forest.create(f"{root}/{fname}", seed_checkpoint=seed_ckpt,
                               seed_meta=dict(meta, tokenizer={"sha256": tok}))
        out[fname] = {}
        for i, (eid, e) in enumerate(spec["experts"].items()):
            cfg = GPTConfig(**dict(PICO, **spec.get("model", {}), **e.get("model", {})))
            parallel.seed_all(1)
            model = build_model(cfg)
            if cfg == base:
                model.load_state_dict(seed_model.state_dict())
            _perturb(model, 100 + i, mlp_only=spec.get("same", False))
            ckpt = save_checkpoint(f"{root}/{fname}-runs/{eid}", step=1, model_chunks=[model],
                                   meta={"model_config": cfg.to_dict(), "tokenizer_sha256": tok})
            forest.add_expert(eid, domain=e["domain"], checkpoint_dir=ckpt, parents=[("seed", 1.0)],
                              cycle=1, steps=1, tokens=1, config={"model": cfg.to_dict()},
                              extra={"tokenizer_sha256": tok})
            if cfg.vocab_size == PICO["vocab_size"]:
                out[fname][eid] = logits_of(model, IDS)
    torch.save(out, result_file)


def load_moe(path, tp=1, ep=1, topk=None):
    """An MoE checkpoint as a Megatron model at (tp, ep) (the groups are re-created)."""
    import dataclasses

    from megatron.core import parallel_state as ps

    from megatron_btm.megatron import parallel
    from megatron_btm.megatron.checkpoint import load_weights
    from megatron_btm.megatron.model import build_model, to_transformer_config
    from megatron_btm.inference.scoring import model_config_of
    cfg, ckpt = model_config_of(path)
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                 expert_tensor_parallel_size=1)
    parallel.seed_all(5)
    k = topk or cfg.moe_router_topk
    tc = to_transformer_config(dataclasses.replace(cfg, moe_router_topk=max(k, 2)), tp=tp)
    tc.moe_router_topk = k  # Megatron refuses k=1 at build time (training); eval is fine
    model = build_model(cfg, tp=tp, transformer_config=tc)
    load_weights([model], ckpt)
    return model


def set_router(model, weight=None, bias=None):
    """Overwrite every layer's router weight (rows [n, H]) and bias ([n])."""
    with torch.no_grad():
        for layer in model.decoder.layers:
            r = layer.mlp.router
            if weight is not None:
                r.weight.copy_(weight)
            if bias is not None:
                r.bias.copy_(bias)


def checks_worker(rank, world, init_file, plan_json, result_file):
    """Run the plan's model checks: [{"name", "ckpt", "tp", "ep", "topk", "router": "zero" |
    {"onehot": e}}] -> {name: logits} (rank 0 writes)."""
    torch.set_num_threads(1)
    from megatron_btm.megatron import parallel
    parallel.init_distributed(init_method=f"file://{init_file}", rank=rank, world_size=world)
    parallel.setup_model_parallel(parallel.ParallelConfig())  # installs the CPU-backend shims
    out = {}
    for item in json.loads(plan_json):
        model = load_moe(item["ckpt"], tp=item.get("tp", 1), ep=item.get("ep", 1), topk=item.get("topk"))
        n = model.config.num_moe_experts
        router = item.get("router")
        if router == "zero":
            set_router(model, torch.zeros(n, PICO["hidden_size"]), torch.zeros(n) if model.config.add_bias_linear else None)
        elif isinstance(router, dict):  # expert e wins by a margin of 100 for every token
            b = torch.zeros(n)
            b[router["onehot"]] = 100.0
            set_router(model, torch.zeros(n, PICO["hidden_size"]), b)
        out[item["name"]] = logits_of(model, IDS)
    if rank == 0:
        torch.save(out, result_file)


# ---- the hand-written reference (GPT-2 style: LayerNorm, learned positions, GeLU, biases, tied) --
def _ln(x, w, b, eps=1e-5):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, eps)


def reference_logits(shared, experts_mlp, mix, ids, heads=PICO["num_attention_heads"]):
    """Logits of the formula x_{l+1} = x' + Σ_e mix_e · MLP_e(LN2(x')), x' = x + Attn(LN1(x)),
    from global checkpoint tensors: `shared` {key: tensor}, `experts_mlp` [{dense MLP key:
    tensor}], `mix` the per-expert output weights. Megatron's fused QKV layout: per head
    [q; k; v] of head_dim rows each."""
    d = "decoder.layers."
    B, S = ids.shape
    x = shared["embedding.word_embeddings.weight"][ids] + shared["embedding.position_embeddings.weight"][:S]
    H = x.shape[-1]
    hd = H // heads
    causal = torch.full((S, S), float("-inf")).triu(1)
    for layer in range(shared[d + "self_attention.linear_qkv.weight"].shape[0]):
        def t(name):
            return shared[d + name][layer]
        h = _ln(x, t("self_attention.linear_qkv.layer_norm_weight"), t("self_attention.linear_qkv.layer_norm_bias"))
        qkv = (h @ t("self_attention.linear_qkv.weight").T + t("self_attention.linear_qkv.bias"))
        q, k, v = qkv.view(B, S, heads, 3 * hd).split(hd, dim=-1)
        att = torch.einsum("bshd,bthd->bhst", q, k) / math.sqrt(hd) + causal
        a = torch.einsum("bhst,bthd->bshd", att.softmax(-1), v).reshape(B, S, H)
        x = x + a @ t("self_attention.linear_proj.weight").T + t("self_attention.linear_proj.bias")
        h = _ln(x, t("mlp.linear_fc1.layer_norm_weight"), t("mlp.linear_fc1.layer_norm_bias"))
        y = 0
        for w, mlp in zip(mix, experts_mlp):
            inner = torch.nn.functional.gelu(h @ mlp[d + "mlp.linear_fc1.weight"][layer].T
                                             + mlp[d + "mlp.linear_fc1.bias"][layer])
            y = y + w * (inner @ mlp[d + "mlp.linear_fc2.weight"][layer].T + mlp[d + "mlp.linear_fc2.bias"][layer])
        x = x + y
    x = _ln(x, shared["decoder.final_layernorm.weight"], shared["decoder.final_layernorm.bias"])
    return x @ shared["embedding.word_embeddings.weight"].T
