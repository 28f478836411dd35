"""`btm prior`, `btm eval`, `btm generate` on the tiny forest, including bad input."""
import json

import pytest
from inference_helpers import run_cli

_run = run_cli


def test_prior_eval_generate(world, tmp_path, capsys):
    from megatron_btm.routing.prior import load_prior
    priors = tmp_path / "priors"
    rc, out, err = _run(["prior", "--forest", str(world.forest), "--data", str(world.data),
                         "--domains", "dom0,dom2", "--num-sequences", "16", "--output", str(priors)], capsys)
    assert rc == 0, err
    p0, ids, meta = load_prior(priors / "dom0.json", ["e0", "e1", "e2"])
    assert ids == ["e0", "e1", "e2"] and meta["domain"] == "dom0" and meta["alpha"] == 0.3
    assert float(p0[0]) > 0.5
    assert float(load_prior(priors / "dom2.json")[0][2]) > 0.5

    single = tmp_path / "dom0.json"
    rc, _, err = _run(["prior", "--forest", str(world.forest), "--data", str(world.data), "--domains",
                       "dom0", "--num-sequences", "16", "--alpha", "0.5", "--output", str(single)], capsys)
    assert rc == 0, err
    assert json.loads(single.read_text())["meta"]["alpha"] == 0.5

    results = tmp_path / "results.json"
    rc, out, err = _run(["eval", "--forest", str(world.forest), "--data", str(world.data),
                         "--domains", "dom0,dom2", "--priors", str(priors), "--topk", "1,3",
                         "--modes", "uniform,cached,cached-fixed", "--max-blocks", "3",
                         "--checkpoint", f"first={world.checkpoints[0]}",
                         "--output", str(results)], capsys)
    assert rc == 0, err
    table = json.loads(results.read_text())
    rows = table["results"]["dom0"]
    assert {"expert/e0", "ensemble/uniform", "ensemble/cached", "ensemble/cached-fixed",
            "top1/doc", "top3/doc", "top1/token", "model/first"} <= set(rows)
    assert rows["model/first"]["nll"] == pytest.approx(rows["expert/e0"]["nll"], abs=1e-9)
    assert rows["top3/doc"]["nll"] == pytest.approx(rows["ensemble/cached"]["nll"], abs=1e-9)
    assert table["priors"]["dom0"] == pytest.approx(p0.tolist())
    assert "ensemble/cached" in out and "dom2" in out.splitlines()[0]  # the printed table

    gen = tmp_path / "gen.json"
    argv = ["generate", "--forest", str(world.forest), "--prior", str(priors / "dom0.json"),
            "--prompt", "the", "--tokenizer", str(world.tokenizer), "--max-new-tokens", "6",
            "--temperature", "0.8", "--top-p", "0.9", "--seed", "1", "--output", str(gen)]
    rc, out, err = _run(argv, capsys)
    assert rc == 0, err
    first = json.loads(gen.read_text())
    assert len(first["tokens"]) == 6 and out.startswith("the")
    assert first["experts"] == ["e0", "e1", "e2"]
    rc, _, _ = _run(argv, capsys)
    assert json.loads(gen.read_text())["tokens"] == first["tokens"]  # same seed, same text
    rc, out, err = _run(["generate", "--checkpoint", str(world.checkpoints[1]), "--prompt", "a b",
                         "--tokenizer", str(world.tokenizer), "--max-new-tokens", "4",
                         "--temperature", "0"], capsys)
    assert rc == 0, err
    assert out.startswith("a b")


def test_bad_inputs(world, tmp_path, capsys):
    from megatron_btm.routing.prior import save_prior
    base = ["--forest", str(world.forest), "--data", str(world.data)]
    rc, _, err = _run(["eval", *base, "--domains", "nope", "--output", str(tmp_path / "r.json")], capsys)
    assert rc == 2 and "nope/test.bin" in err and "dom0" in err
    rc, _, err = _run(["prior", *base, "--domains", "nope", "--output", str(tmp_path / "p.json")], capsys)
    assert rc == 2 and "nope/valid.bin" in err
    priors = tmp_path / "priors"
    priors.mkdir()
    rc, _, err = _run(["eval", *base, "--domains", "dom1", "--priors", str(priors),
                       "--output", str(tmp_path / "r.json")], capsys)
    assert rc == 2 and "no prior file" in err and "dom1.json" in err
    save_prior(priors / "dom1.json", [0.5, 0.5], ["e0", "other"], "dom1")
    rc, _, err = _run(["eval", *base, "--domains", "dom1", "--priors", str(priors),
                       "--output", str(tmp_path / "r.json")], capsys)
    assert rc == 2 and "missing from the prior ['e1', 'e2']" in err and "['other']" in err
    rc, _, err = _run(["generate", "--forest", str(world.forest), "--prior", str(priors / "dom1.json"),
                       "--prompt", "x", "--tokenizer", str(world.tokenizer)], capsys)
    assert rc == 2 and "do not match the forest" in err
    rc, _, err = _run(["generate", "--forest", str(world.forest), "--prior", str(tmp_path / "none.json"),
                       "--prompt", "x", "--tokenizer", str(world.tokenizer)], capsys)
    assert rc == 2 and "none.json" in err
    rc, _, err = _run(["eval", *base, "--domains", "dom1", "--topk", "1,x",
                       "--output", str(tmp_path / "r.json")], capsys)
    assert rc == 2 and "--topk" in err
    rc, _, err = _run(["prior", *base, "--domains", "dom0,dom1", "--output", str(tmp_path / "p.json")], capsys)
    assert rc == 2 and "holds one domain" in err
    assert not (tmp_path / "r.json").exists()


def test_prior_of_another_domain_is_refused(world, tmp_path, capsys):
    from megatron_btm.routing.prior import save_prior
    save_prior(tmp_path / "dom0.json", [0.2, 0.3, 0.5], ["e0", "e1", "e2"], "dom2")
    rc, _, err = _run(["eval", "--forest", str(world.forest), "--data", str(world.data),
                       "--domains", "dom0", "--priors", str(tmp_path), "--output",
                       str(tmp_path / "r.json")], capsys)
    assert rc == 2 and "prior of domain 'dom2', not 'dom0'" in err
