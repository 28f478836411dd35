"""Loading verifies checksums: corrupt or missing checkpoint files are reported by name."""
from __future__ import annotations

import pytest
from forest_testutil import make_checkpoint

from megatron_btm.forest import CorruptCheckpointError, Forest


@pytest.fixture
def forest(tmp_path):
    f = Forest.create(tmp_path / "f", seed_checkpoint=make_checkpoint(tmp_path / "s", 0),
                      seed_meta={})
    for i, eid in enumerate(["legal", "bio"]):
        f.add_expert(eid, domain=eid, checkpoint_dir=make_checkpoint(tmp_path / eid, i + 1),
                     parents=[("seed", 1.0)], cycle=1, steps=1, tokens=1, config={})
    return f


def flip_byte(path, offset=100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_intact_forest_verifies(forest):
    assert forest.verify() == ["seed", "bio", "legal"]
    assert forest.verify("bio") == ["bio"]


def test_flipped_byte_is_corrupt_naming_expert_and_file(forest):
    target = forest.checkpoint_path("legal") / "model" / "__1_0.distcp"
    flip_byte(target)
    calls = (forest.verify, lambda: forest.verify("legal"),
             lambda: forest.checkpoint_path("legal"))
    for call in calls:
        with pytest.raises(CorruptCheckpointError,
                           match=r"expert 'legal'.*model/__1_0\.distcp is corrupt"):
            call()
    assert forest.verify("bio") == ["bio"]  # the others are unaffected
    assert forest.checkpoint_path("legal", verify=False).is_dir()  # opt-out still returns it
    flip_byte(target)  # flipping back restores the recorded bytes
    assert forest.verify("legal") == ["legal"]


def test_missing_file_is_reported_by_name(forest):
    (forest.checkpoint_path("bio") / ".metadata").unlink()
    with pytest.raises(FileNotFoundError, match=r"expert 'bio'.*checkpoint/\.metadata is missing"):
        forest.checkpoint_path("bio")


def test_unexpected_extra_file(forest):
    (forest.checkpoint_path("bio") / "model" / "stray.bin").write_bytes(b"x")
    with pytest.raises(CorruptCheckpointError, match=r"unexpected file .*model/stray\.bin"):
        forest.verify("bio")


def test_missing_meta_or_folder(forest):
    (forest.root / "experts" / "bio" / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"expert 'bio'.*bio/meta\.json is missing"):
        forest.verify("bio")
    import shutil
    shutil.rmtree(forest.checkpoint_path("legal", verify=False))
    with pytest.raises(FileNotFoundError, match=r"expert 'legal'.*checkpoint folder .* is missing"):
        forest.verify("legal")


def test_edited_meta_json_is_detected(forest):
    import json
    meta_path = forest.root / "experts" / "bio" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["files"]["model/__0_0.distcp"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CorruptCheckpointError, match="does not match forest.json"):
        forest.verify("bio")


def test_corrupt_seed(forest):
    flip_byte(forest.seed_checkpoint_path() / "meta.json", offset=3)
    with pytest.raises(CorruptCheckpointError,
                       match=r"the seed: .*checkpoint/meta\.json is corrupt"):
        forest.verify()
