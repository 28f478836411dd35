import os
import stat

import pytest

from megatron_btm.utils import io


def test_atomic_write_json_replaces_whole_file_with_normal_permissions(tmp_path):
    path = tmp_path / "a" / "x.json"
    io.atomic_write_json(path, {"b": 1})
    io.atomic_write_json(path, {"b": 2})
    assert io.read_json(path) == {"b": 2}
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]  # no temp leftovers
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_atomic_dir_appears_only_when_complete(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with io.atomic_dir(final) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("crash mid-write")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with io.atomic_dir(final) as tmp:
        (tmp / "done").write_text("y")
    assert (final / "done").read_text() == "y"
    with pytest.raises(FileExistsError, match="already exists"):
        with io.atomic_dir(final):
            pass


def test_read_json_names_the_file_and_position(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1,,}')
    with pytest.raises(ValueError, match=r"bad.json: not valid JSON \(line 1, column 9"):
        io.read_json(bad)
    with pytest.raises(FileNotFoundError, match="missing.json: file not found"):
        io.read_json(tmp_path / "missing.json")


def test_sha256_tree_and_stale_cleanup(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"abc")
    (tmp_path / ".tmp-left").mkdir()
    tree = io.sha256_tree(tmp_path / "d")
    assert tree == {"f": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}
    assert [p.name for p in io.cleanup_stale_tmp(tmp_path)] == [".tmp-left"]
