"""`btm eval --route ... --topk k` and `btm generate --topk k` on the tiny forest."""
import json

from inference_helpers import run_cli

from megatron_btm.routing.prior import save_prior

_run = run_cli


def test_eval_route_and_generate_topk(world, tmp_path, capsys):
    priors = tmp_path / "priors"
    save_prior(priors / "dom1.json", [0.2, 0.5, 0.3], ["e0", "e1", "e2"], "dom1")
    base = ["eval", "--forest", str(world.forest), "--data", str(world.data), "--domains", "dom1",
            "--max-blocks", "3", "--priors", str(priors)]
    results = tmp_path / "routed.json"
    rc, out, err = _run(base + ["--route", "prefix:4", "--topk", "1", "--output", str(results)], capsys)
    assert rc == 0, err
    cell = json.loads(results.read_text())["results"]["dom1"]
    # 3 experts score the 3 predictions of each block's 4-id prefix, then 1 expert the block
    assert cell["expert_forwards_per_token"] == (3 * 3 * 3 + 1 * 3 * 16) / cell["tokens"]
    assert "fwd/token" in out
    refused = tmp_path / "refused.json"  # (an existing --output is refused before routing)
    rc, _, err = _run(base + ["--route", "prior", "--topk", "1,2", "--output", str(refused)], capsys)
    assert rc == 2 and "exactly one --topk" in err
    rc, _, err = _run(base + ["--route", "prior", "--topk", "5", "--output", str(refused)], capsys)
    assert rc == 2 and "larger than the forest" in err and len(err.strip().splitlines()) == 1

    gen = tmp_path / "gen.json"
    argv = ["generate", "--forest", str(world.forest), "--prior", str(priors / "dom1.json"),
            "--prompt", "the cat sat", "--tokenizer", str(world.tokenizer), "--max-new-tokens", "5",
            "--temperature", "0", "--topk", "2", "--output", str(gen)]
    rc, out, err = _run(argv, capsys)
    assert rc == 0, err
    data = json.loads(gen.read_text())
    assert data["experts"] == ["e1", "e2"] and len(data["tokens"]) == 5
    assert data["cost"]["max_models_in_memory"] <= 3
    rc, _, err = _run(argv[:-4] + ["--topk", "1", "--route", "prefix:50"], capsys)
    assert rc == 2 and "longer than the prompt" in err
    other = tmp_path / "other.json"
    save_prior(other, [0.5, 0.5], ["e0", "x9"], "dom1")
    rc, _, err = _run(argv[:3] + ["--prior", str(other)] + argv[5:], capsys)
    assert rc == 2 and "do not match the forest" in err
