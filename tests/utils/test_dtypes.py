import pytest
import torch

from megatron_btm.utils.dtypes import DTYPE_NAMES, check_dtype, torch_dtype, torch_dtype_name


def test_names_map_to_torch_dtypes():
    assert [torch_dtype(n) for n in DTYPE_NAMES] == [torch.float32, torch.bfloat16, torch.float16]
    assert torch_dtype_name("bf16") == "bfloat16"
    with pytest.raises(ValueError, match=r"export.dtype='fp8': valid values are \('fp32', 'bf16', 'fp16'\)"):
        check_dtype("fp8", "export.dtype")
