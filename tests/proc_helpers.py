"""Process liveness for tests that check a process dies with its parent."""
import time


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def outlives(pid: int, seconds: float) -> bool:
    """Wait up to `seconds` for `pid` to end; True if it is still alive then."""
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive(pid)
