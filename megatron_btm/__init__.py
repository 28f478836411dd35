"""megatron-btm: Branch-Train-Merge (ELMForest) training on Megatron-Core.

Importing the package is cheap: Megatron-Core (≈3 s to import) is only imported by the modules
that build models, train or read checkpoints.
"""
import warnings

__version__ = "0.1.0"

# Megatron-Core and torch.distributed.checkpoint print ~20 warnings on machines without TE/apex;
# none is actionable for our users. Silenced here, in one place, by exact message.
for _pattern in (
    r".*Transformer Engine.*",
    r".*[Aa]pex.*not installed.*",
    r".*full scope is deprecated.*",
    r".*torch\.jit\..*deprecated.*",
    r".*Please use DTensor instead.*",
    r".*TypedStorage is deprecated.*",
):
    warnings.filterwarnings("ignore", message=_pattern)
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"megatron\..*")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"megatron\..*")
