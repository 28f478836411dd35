"""Our entry into Megatron-Core: layer specs, model builder, CPU backend, checkpoints.

Importing this package does not import megatron.core itself; the submodules do. (Megatron's
import-time warnings are filtered in megatron_btm/__init__.py.)
"""
