import pytest
import torch

from megatron_btm.averaging.methods import METHODS, get_method, merge_tensors, normalize_weights


def test_registry_names_and_unknown_name_lists_valid_ones():
    assert set(METHODS) == {"uniform", "weighted", "argmax", "posterior", "topk"}
    with pytest.raises(ValueError, match="unknown averaging method 'mean'.*uniform, weighted, argmax, posterior, topk"):
        get_method("mean")


def test_methods_weights():
    prior = [0.1, 0.5, 0.15, 0.25]
    assert get_method("uniform")(4) == [0.25] * 4
    assert get_method("argmax")(4, prior=prior) == [0.0, 1.0, 0.0, 0.0]
    assert get_method("posterior")(4, prior=prior) == pytest.approx(prior)
    assert get_method("topk")(4, prior=prior, k=2) == pytest.approx([0, 0.5 / 0.75, 0, 0.25 / 0.75])
    assert get_method("topk")(4, prior=prior, k=4) == pytest.approx(prior)
    assert get_method("weighted")(3, weights=[0.2, 0.3, 0.5]) == pytest.approx([0.2, 0.3, 0.5])


def test_topk_k_greater_than_n():
    with pytest.raises(ValueError, match=r"k=5.*n=4"):
        get_method("topk")(4, prior=[0.25] * 4, k=5)
    with pytest.raises(ValueError, match="needs k"):
        get_method("topk")(4, prior=[0.25] * 4)


def test_weights_not_summing_to_one_are_normalised_with_warning():
    with pytest.warns(UserWarning, match="sum to 4.0, not 1"):
        assert normalize_weights([1, 1, 2]) == [0.25, 0.25, 0.5]
    with pytest.warns(UserWarning):
        assert get_method("weighted")(2, weights=[3, 1]) == [0.75, 0.25]


@pytest.mark.parametrize("bad, match", [([0.5, -0.5, 1.0], r"weights\[1\]=-0.5"), ([0, 0], "all weights are 0"),
                                        ([float("nan"), 1], r"weights\[0\]=nan"), ([], "empty")])
def test_bad_weights_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        normalize_weights(bad)


def test_wrong_number_of_weights_or_missing_prior():
    with pytest.raises(ValueError, match="weights: 2 values for 3 experts"):
        get_method("weighted")(3, weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="needs prior"):
        get_method("posterior")(3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_merge_tensors_matches_float64_reference(dtype):
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(5, 7, generator=g).to(dtype) for _ in range(3)]
    w = [0.2, 0.3, 0.5]
    got = merge_tensors(ts, w)
    assert got.dtype == dtype
    ref = sum(wi * t.double() for wi, t in zip(w, ts))
    # fp32 accumulation then one rounding to `dtype`: within one ulp of the exact result
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)


def test_merge_tensors_accumulates_in_fp32_not_bf16():
    # 1 + 64 small bf16 terms: summed in bf16 each 2^-9 term rounds away; in fp32 they add up to 1/8
    big = torch.ones(1, dtype=torch.bfloat16)
    small = torch.full((1,), 2.0 ** -9, dtype=torch.bfloat16)
    got = merge_tensors([big] + [small] * 64, [1.0] + [1.0] * 64)
    assert got.item() == 1.125


def test_merge_tensors_one_hot_is_bit_exact_even_with_nan_elsewhere():
    a = torch.randn(4, 4, dtype=torch.bfloat16)
    b = torch.full((4, 4), float("nan"), dtype=torch.bfloat16)
    assert torch.equal(merge_tensors([b, a], [0.0, 1.0]), a)


def test_merge_tensors_shape_mismatch():
    with pytest.raises(ValueError, match=r"tensor 1 is torch.float32\[3\]"):
        merge_tensors([torch.zeros(2), torch.zeros(3)], [0.5, 0.5])
