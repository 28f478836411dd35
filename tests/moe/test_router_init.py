"""router_init.rows_from_stats on hand-made router inputs: each method's rows (and lda's bias)
equal its formula, and lda separates domains whose means differ along a low-variance
direction that the mean-based rows miss."""
import pytest
import torch

from megatron_btm.moe import router_init


def stats_of(xs: dict) -> dict:
    """domain_stats' entries from {domain: [L, N, H] float64 tokens}."""
    return {d: router_init.stats_of_tokens(x) for d, x in xs.items()}


def tokens(seed, mean, scale, n=4000):
    """[1, n, H] gaussian tokens: a common offset, per-dimension scale."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, n, len(mean), generator=g, dtype=torch.float64) * torch.tensor(scale)
            + torch.tensor(mean, dtype=torch.float64))


def test_rows_equal_their_formulas():
    xs = {"a": tokens(0, [5.0, 1.0, 0.0], [1.0, 0.3, 0.2]),
          "b": tokens(1, [5.0, 0.0, 1.0], [2.0, 0.5, 0.1])}
    stats = stats_of(xs)
    mu = {d: x[0].mean(0) for d, x in xs.items()}
    center = (mu["a"] + mu["b"]) / 2
    rows, bias = router_init.rows_from_stats(stats, ["b", "a", "b"], "hidden")
    assert bias is None and rows.shape == (1, 3, 3)
    torch.testing.assert_close(rows[0, 1].double(), mu["a"] / mu["a"].norm(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rows[0, 0], rows[0, 2])   # experts of one domain share a row
    rows, _ = router_init.rows_from_stats(stats, ["a", "b"], "hidden-centered")
    want = (mu["b"] - center) / (mu["b"] - center).norm()
    torch.testing.assert_close(rows[0, 1].double(), want, rtol=1e-6, atol=1e-6)
    a = 0.2
    rows, bias = router_init.rows_from_stats(stats, ["a", "b"], "lda", shrinkage=a)
    cov = sum(torch.cov(x[0].t(), correction=0) for x in xs.values()) / 2
    s = (1 - a) * cov + a * cov.trace() / 3 * torch.eye(3, dtype=torch.float64)
    for e, d in enumerate(["a", "b"]):
        w = torch.linalg.solve(s, mu[d] - center)
        torch.testing.assert_close(rows[0, e].double(), w, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bias[0, e].double(), -0.5 * w @ (mu[d] + center), rtol=1e-5, atol=1e-5)


def test_lda_routes_what_the_means_miss():
    # a large shared component (dimension 0) and a domain difference along a quiet dimension
    # (2) next to a noisy one (1): hidden's rows are nearly equal; lda weights dimension 2
    xs = {"a": tokens(2, [10.0, 0.5, 0.2], [1.0, 3.0, 0.1]),
          "b": tokens(3, [10.0, -0.5, -0.2], [1.0, 3.0, 0.1])}
    held = {"a": tokens(4, [10.0, 0.5, 0.2], [1.0, 3.0, 0.1]),
            "b": tokens(5, [10.0, -0.5, -0.2], [1.0, 3.0, 0.1])}
    stats = stats_of(xs)

    def own(method):
        rows, bias = router_init.rows_from_stats(stats, ["a", "b"], method)
        hits = []
        for e, d in enumerate(["a", "b"]):
            logits = held[d][0].float() @ rows[0].t() + (0 if bias is None else bias[0])
            hits.append((logits.argmax(-1) == e).float().mean().item())
        return min(hits)

    assert own("lda") > 0.95
    assert own("hidden") < 0.8 and own("lda") > own("hidden-centered")


def test_bad_method_and_empty_domain():
    stats = stats_of({"a": tokens(0, [1.0, 0.0], [1.0, 1.0], n=10)})
    with pytest.raises(ValueError, match="router method 'mean'"):
        router_init.rows_from_stats(stats, ["a"], "mean")
    stats["b"] = {"sum": torch.zeros(1, 2, dtype=torch.float64),
                  "outer": torch.zeros(1, 2, 2, dtype=torch.float64), "count": 0}
    with pytest.raises(ValueError, match="no valid tokens .* b"):
        router_init.rows_from_stats(stats, ["a", "b"], "lda")
