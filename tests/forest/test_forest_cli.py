"""`btm forest {init,ls,show,rm,verify}` through the real `btm` entry point."""
from __future__ import annotations

import json

import pytest
from forest_testutil import make_checkpoint, tree_digest

from megatron_btm.cli import main
from megatron_btm.forest import Forest


def btm(capsys, *argv):
    rc = main(["forest", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def root(tmp_path, capsys):
    seed = make_checkpoint(tmp_path / "seed-ckpt", 0)
    rc, out, _ = btm(capsys, "init", "--forest", tmp_path / "f", "--checkpoint", seed,
                     "--seed-meta", '{"steps": 3, "tokens": 300}', "--domains-mix", '{"legal": 1}')
    assert rc == 0 and "created forest" in out
    f = Forest.open(tmp_path / "f")
    f.add_expert("legal-1", domain="legal", checkpoint_dir=make_checkpoint(tmp_path / "l", 1),
                 parents=[("seed", 1.0)], cycle=1, steps=10, tokens=1000, config={})
    f.add_expert("bio-2", domain="bio", checkpoint_dir=make_checkpoint(tmp_path / "b", 2),
                 parents=[("legal-1", 0.6), ("seed", 0.4)], cycle=2, steps=20, tokens=2000,
                 config={})
    return tmp_path / "f"


def test_init_records_seed(root, tmp_path):
    seed = Forest.open(root).seed()
    assert (seed.steps, seed.tokens, seed.extra["domains_mix"]) == (3, 300, {"legal": 1.0})
    assert seed.checkpoint_sha256 == tree_digest(tmp_path / "seed-ckpt")


def test_init_reads_checkpoint_meta_by_default_and_refuses_existing(tmp_path, capsys, root):
    seed = make_checkpoint(tmp_path / "ck2", 5)  # its meta.json says step 5
    assert btm(capsys, "init", "--forest", tmp_path / "g", "--checkpoint", seed)[0] == 0
    assert Forest.open(tmp_path / "g").seed().steps == 5
    rc, _, err = btm(capsys, "init", "--forest", root, "--checkpoint", seed)
    assert rc == 2 and "a forest already exists" in err
    rc, _, err = btm(capsys, "init", "--forest", tmp_path / "h", "--checkpoint", seed,
                     "--seed-meta", "{not json")
    assert rc == 2 and "--seed-meta: not valid JSON" in err and not (tmp_path / "h").exists()


def test_ls_table_and_json(root, capsys):
    rc, out, _ = btm(capsys, "ls", "--forest", root)
    lines = out.splitlines()
    assert rc == 0 and "2 expert(s)" in lines[0]
    assert lines[1].split() == ["ID", "DOMAIN", "CYCLE", "PARENTS", "STEPS", "TOKENS", "CREATED"]
    assert lines[2].split()[:4] == ["legal-1", "legal", "1", "seed:1"]
    assert lines[3].split()[:6] == ["bio-2", "bio", "2", "legal-1:0.6,", "seed:0.4", "20"]
    rc, out, _ = btm(capsys, "ls", "--forest", root, "--json")
    assert [r["id"] for r in json.loads(out)] == ["legal-1", "bio-2"]


def test_ls_empty_forest(tmp_path, capsys):
    Forest.create(tmp_path / "e", seed_checkpoint=make_checkpoint(tmp_path / "s", 0), seed_meta={})
    rc, out, _ = btm(capsys, "ls", "--forest", tmp_path / "e")
    assert rc == 0 and "0 expert(s)" in out and "no experts yet" in out


def test_show_prints_record_and_lineage_tree(root, capsys):
    rc, out, _ = btm(capsys, "show", "--forest", root, "bio-2")
    assert rc == 0 and '"checkpoint_format": "torch_dist"' in out
    tree = out[out.index("lineage:"):].splitlines()
    assert tree[1:5] == ["bio-2 (cycle 2, bio)", "└── legal-1  (weight 0.6)",
                         "    └── seed  (weight 1)", "└── seed  (weight 0.4)"]
    rc, out, _ = btm(capsys, "show", "--forest", root, "seed")
    assert rc == 0 and "descendants: legal-1, bio-2" in out


def test_rm_warns_and_needs_confirmation(root, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    rc, _, err = btm(capsys, "rm", "--forest", root, "legal-1")
    assert rc == 2 and "pass --yes" in err and [r.id for r in Forest.open(root).experts()] == \
        ["legal-1", "bio-2"]
    rc, out, err = btm(capsys, "rm", "--forest", root, "legal-1", "--yes")
    assert rc == 0 and "removed expert 'legal-1'" in out
    assert "warning:" in err and "['bio-2'] descend from it" in err
    assert [r.id for r in Forest.open(root).experts()] == ["bio-2"]


def test_errors_exit_2_naming_the_input(root, capsys):
    rc, _, err = btm(capsys, "show", "--forest", root, "nobody")
    assert rc == 2 and "unknown expert 'nobody'" in err and "bio-2" in err
    rc, _, err = btm(capsys, "rm", "--forest", root, "../etc", "--yes")
    assert rc == 2 and "'../etc' is not allowed" in err
    rc, _, err = btm(capsys, "ls", "--forest", root / "missing")
    assert rc == 2 and "forest.json: no forest here" in err


def test_verify(root, capsys):
    rc, out, _ = btm(capsys, "verify", "--forest", root)
    assert rc == 0 and out.split() == ["ok", "seed", "ok", "legal-1", "ok", "bio-2"]
    target = root / "experts" / "bio-2" / "checkpoint" / "model" / "__0_0.distcp"
    data = bytearray(target.read_bytes())
    data[0] ^= 0xFF
    target.write_bytes(bytes(data))
    rc, _, err = btm(capsys, "verify", "--forest", root, "bio-2")
    assert rc == 2 and "expert 'bio-2'" in err and "__0_0.distcp is corrupt" in err
