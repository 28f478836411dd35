"""Our entry into Megatron-Core: layer specs, model builder, CPU backend, checkpoints.

`import megatron_btm.megatron` silences Megatron-Core's import-time noise (in this one place)
but does not import megatron.core itself; the submodules do.
"""
import warnings

# Megatron-Core prints ~20 warnings on import on machines without TE/apex; they say nothing
# actionable to our users. Keep the list short and specific.
for _pattern in (
    r".*Transformer Engine.*",
    r".*[Aa]pex.*not installed.*",
    r".*full scope is deprecated.*",
    r".*torch\.jit\..*deprecated.*",
    r".*`torch\.distributed\._shard.*",
    r".*TypedStorage is deprecated.*",
):
    warnings.filterwarnings("ignore", message=_pattern)
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"megatron\..*")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"megatron\..*")
