"""Pilot: short dense runs of candidate shapes on the V=2048 data; valid loss + throughput."""
import json, sys, time
from pathlib import Path
from megatron_btm.experiment.plan import ExperimentPlan
from megatron_btm.experiment import units, claims
from megatron_btm.megatron import parallel
from megatron_btm.data.tokenizer import load_tokenizer


def main():
    data = Path("/work/runs/headline/data-v2048")
    vocab = load_tokenizer(data / "tokenizer.json").vocab_size
    parallel.init_distributed()
    TRAIN = "bible novels legal dictionary biology code_c code_python changelogs".split()
    out = Path("/work/runs/headline/pilot"); out.mkdir(parents=True, exist_ok=True)
    steps = int(sys.argv[1])
    results = []
    for spec in sys.argv[2:]:
        shape, lr = spec.split("@")
        L, h = map(int, shape.split("x")); lr = float(lr)
        model = {"num_layers": L, "hidden_size": h, "num_attention_heads": 4, "seq_length": 256}
        plan = ExperimentPlan(name="pilot", corpus="/work/shared/corpora", train_domains=TRAIN,
                              vocab_size=2048, model=model, total_tokens=steps * 2048, lr=lr, min_lr=lr / 10,
                              threads=2, dense_seeds=[1234])
        import torch; torch.set_num_threads(2)
        t = time.perf_counter()
        stage = units.run_dense(plan, data, out / f"dense-{spec}-{steps}", steps, vocab, 1234)
        wall = time.perf_counter() - t
        ckpt = out / f"dense-{spec}-{steps}" / "checkpoints" / stage["checkpoint"]
        ev = units.eval_models({"dense": ckpt}, data, TRAIN, split="valid", max_blocks=24)
        from megatron_btm.inference.tables import mean_ppl
        ppl = mean_ppl(ev, "model/dense", TRAIN)
        n = claims.num_params(model, vocab)
        r = {"shape": shape, "lr": lr, "vocab": vocab, "params": n, "steps": steps, "tokens": stage["tokens"],
             "tokens_per_param": stage["tokens"] / n, "wall_s": round(wall, 1),
             "device_seconds": stage["device_seconds"], "tokens_per_s": stage["tokens"] / wall,
             "valid_loss_stage": stage.get("valid_loss"), "valid_ppl_train_domains": ppl}
        print(json.dumps(r), flush=True)
        results.append(r)
        with open(out / "pilot.jsonl", "a") as f:
            f.write(json.dumps(r) + "\n")


if __name__ == '__main__':
    main()
