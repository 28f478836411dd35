"""The ELMForest registry: forest.json, one folder per expert, lineage, locking.

    forest = Forest.create(root, seed_checkpoint=ckpt, seed_meta={...})
    forest.add_expert("legal-c1", domain="legal", checkpoint_dir=..., parents=[("seed", 1.0)],
                      cycle=1, steps=..., tokens=..., config={...})   # the BTM merge step
    forest.experts(); forest.lineage("legal-c1"); forest.remove("legal-c1")

Everything here is plain file I/O (no torch, no Megatron): checkpoints are opaque folders.
"""
from megatron_btm.forest.lock import ForestLock
from megatron_btm.forest.names import SEED_ID, check_domain, check_expert_id, check_name
from megatron_btm.forest.records import (
    CorruptCheckpointError,
    ExpertRecord,
    ForestLockTimeout,
    ForestSnapshot,
    checkpoint_digest,
)
from megatron_btm.forest.registry import Forest
from megatron_btm.forest.verify import UnknownExpertError

__all__ = [
    "CorruptCheckpointError", "ExpertRecord", "Forest", "ForestLock", "ForestLockTimeout",
    "ForestSnapshot", "SEED_ID", "UnknownExpertError", "check_domain", "check_expert_id",
    "check_name", "checkpoint_digest",
]
