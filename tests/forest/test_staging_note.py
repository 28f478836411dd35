"""A merge killed while writing its staging folder's move note (before anything moved in) leaves
a half-written note: the next cleanup removes that staging instead of keeping it forever."""
import os

from megatron_btm.forest.staging import MOVE_NOTE, Staging, cleanup_stale


def test_half_written_move_note_without_checkpoint_is_cleaned(tmp_path):
    st = Staging(tmp_path, "bible")
    (st.dir / MOVE_NOTE).write_text('{"sour')   # killed mid-write (the note is now atomic)
    st._fd, fd = None, st._fd                   # the process "dies": its lock is released
    os.close(fd)
    assert cleanup_stale(tmp_path) == [st.dir]
    assert not st.dir.exists() and not st.lock_path.exists()


def test_move_note_is_written_whole(tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "x.bin").write_bytes(b"123")
    (tmp_path / "forest").mkdir()
    st = Staging(tmp_path / "forest", "bible")
    st.fill(src, move=True)
    assert (st.dir / MOVE_NOTE).read_text().startswith('{"source"')
    assert [p.name for p in st.dir.iterdir() if p.name.startswith(".tmp-")] == []
    st.discard()
    assert (src / "a" / "x.bin").read_bytes() == b"123"
