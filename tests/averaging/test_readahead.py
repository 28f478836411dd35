"""btm average's early readahead: bounded, per expert, never an error."""
import os

from megatron_btm.averaging import readahead


def test_readahead_is_bounded_and_split_per_checkpoint(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: calls.append((os.readlink(f"/proc/self/fd/{fd}"), off, n, advice)))
    dirs = []
    for name, sizes in {"a": [700, 500], "b": [300], "c": []}.items():
        d = tmp_path / name
        d.mkdir()
        for i, size in enumerate(sizes):
            (d / f"__{i}_0.distcp").write_bytes(b"x" * size)
        (d / ".metadata").write_bytes(b"m")  # not data: never advised
        dirs.append(d)
    t = readahead.start_readahead(dirs, budget_bytes=3000)  # 1000 bytes per checkpoint
    t.join(10)
    assert not t.is_alive()
    assert [(os.path.relpath(p, tmp_path), off, n) for p, off, n, _ in calls] == [
        ("a/__0_0.distcp", 0, 700), ("a/__1_0.distcp", 0, 300), ("b/__0_0.distcp", 0, 300)]
    assert {adv for *_, adv in calls} == {os.POSIX_FADV_WILLNEED}


def test_readahead_nothing_to_do(tmp_path):
    assert readahead.start_readahead([]) is None
    assert readahead.start_readahead([tmp_path]) is None  # no data files
    assert readahead.start_readahead([tmp_path / "missing"]) is None
