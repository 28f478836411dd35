"""Experts loaded on demand: at most `capacity` models in memory, least recently used evicted.

With n experts on disk and k active, a pool of capacity k + a small spare holds the active
ones (and the spare most recently used); a forest of 64 experts generates on a machine that
could not hold 64. `peak` is the largest number of models ever held at once, `loads` how many
times a checkpoint was read.
"""
from __future__ import annotations

import ctypes
import gc
import os
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

from megatron_btm.errors import ConfigError


class ExpertPool:
    """(id, checkpoint) pairs of a forest; `get(ids)` returns loaded experts, loading on demand."""

    def __init__(self, checkpoints: Sequence[tuple[str, str | os.PathLike]], *, capacity: int,
                 tp: int | None = None, dtype=None):
        if not checkpoints:
            raise ConfigError("no checkpoints given; the pool needs at least one expert")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ConfigError(f"capacity={capacity!r}: must be an integer >= 1 (models in memory)")
        self.ids = [name for name, _ in checkpoints]
        if len(set(self.ids)) != len(self.ids):
            raise ConfigError(f"expert ids must be unique, got {self.ids}")
        self.paths = {name: Path(p) for name, p in checkpoints}
        self.capacity, self.tp, self.dtype = capacity, tp, dtype
        self._held: OrderedDict[str, object] = OrderedDict()
        self.peak = 0
        self.loads = 0

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def held(self) -> list[str]:
        """Ids in memory, least recently used first."""
        return list(self._held)

    def index(self, expert_id: str) -> int:
        return self.ids.index(expert_id)

    def get(self, expert_ids: Sequence[str]):
        """The experts `expert_ids` (loaded if needed), in that order. More ids than the
        capacity at once is an error: they could not all be in memory."""
        from megatron_btm.inference.scoring import check_compatible, load_expert
        unknown = [i for i in expert_ids if i not in self.paths]
        if unknown:
            raise ConfigError(f"unknown expert id(s) {unknown}; the forest has {self.ids}")
        if len(set(expert_ids)) > self.capacity:
            raise ConfigError(f"{len(set(expert_ids))} experts requested at once but the pool "
                              f"holds at most {self.capacity} models")
        for i in expert_ids:  # touch the ones already held so they are not evicted below
            if i in self._held:
                self._held.move_to_end(i)
        out = []
        for i in expert_ids:
            if i not in self._held:
                while len(self._held) >= self.capacity:
                    victim = next(v for v in self._held if v not in expert_ids)
                    del self._held[victim]
                    _release_memory()
                kwargs = {} if self.dtype is None else {"dtype": self.dtype}
                self._held[i] = load_expert(self.paths[i], name=i, tp=self.tp, **kwargs)
                self.loads += 1
                self.peak = max(self.peak, len(self._held))
            self._held.move_to_end(i)
            out.append(self._held[i])
        check_compatible(out)
        return out

    def clear(self) -> None:
        self._held.clear()
        _release_memory()


def _release_memory() -> None:
    """Collect the evicted model and hand freed heap pages back to the OS (glibc's malloc_trim:
    without it, RSS creeps up with every load even though the memory is free)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
