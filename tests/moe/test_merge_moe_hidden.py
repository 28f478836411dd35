"""`btm merge-moe --router hidden|lda` on a 2-domain pico forest trained with the project's own
commands (preprocess, train-seed, merge --seed, cycle) on real text: before any router
training, top-1 routing sends most of each domain's held-out tokens to that domain's expert."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from integrity_helpers import corpus_slice  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "tiny.yaml"
DOMAINS = {"code_c": "code_c", "bible": "bible"}  # two very different corpora

pytestmark = pytest.mark.slow


def btm(*args):
    proc = subprocess.run([sys.executable, "-m", "megatron_btm.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def pico(corpora, tmp_path_factory):
    """(data folder, forest) of the 2-domain pico forest."""
    tmp_path = tmp_path_factory.mktemp("pico")
    corpus_slice(corpora, tmp_path / "corpus", DOMAINS, rows=20)
    data = tmp_path / "data"
    btm("preprocess", "--corpus", tmp_path / "corpus", "--output", data, "--vocab-size", 512,
        "--workers", 1, "--no-progress")
    sets = ["--set", "eval_interval=0", "--set", "model.vocab_size=512"]
    btm("train-seed", "--config", TINY, *sets, "--set", "steps=40", "--set", "save_interval=40",
        "--data", data, "--domains", ",".join(DOMAINS), "--output", tmp_path / "seed")
    forest = tmp_path / "forest"
    btm("merge", "--forest", forest, "--seed", "--run", tmp_path / "seed")
    btm("cycle", "--forest", forest, "--data", data, "--domains", ",".join(DOMAINS), "--config", TINY,
        *sets, "--set", "steps=20", "--set", "save_interval=20", "--output", tmp_path / "cycle1",
        "--parallel", 2)
    return data, forest


@pytest.mark.parametrize("router", ["hidden", "lda"])
def test_data_router_sends_each_domain_to_its_expert(pico, router, tmp_path):
    data, forest = pico
    moe = tmp_path / "moe"
    summary = json.loads(btm("merge-moe", "--forest", forest, "--output", moe, "--router", router,
                             "--data", data, "--topk", 1, "--no-progress"))
    meta = json.loads((moe / "meta.json").read_text())["moe_merge"]
    assert meta["router"]["init"] == router and summary["experts"] == meta["expert_ids"]
    # tiny.yaml is GPT-2 style (a router bias): lda writes its bias there
    assert meta["router"]["bias"] == ("lda" if router == "lda" else "zeros")
    assert not list(moe.glob(".uniform-router*"))  # the scratch checkpoint is gone
    # routing of held-out (test split) tokens, measured in a fresh process (Megatron model)
    code = ("import json, sys\n"
            "from megatron_btm.inference.blocks import read_eval_blocks\n"
            "from megatron_btm.moe.router_init import routing_fractions\n"
            "b = {d: read_eval_blocks(sys.argv[1], d, 'test', 64, max_blocks=16) for d in sys.argv[3:]}\n"
            "print(json.dumps(routing_fractions(sys.argv[2], b)))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(data), str(moe), *meta["domains"]],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fractions = json.loads(proc.stdout.strip().splitlines()[-1])
    for e, domain in enumerate(meta["domains"]):
        own = [layer[e] for layer in fractions[domain]]
        assert min(own) >= 0.7, (domain, fractions)  # every layer
