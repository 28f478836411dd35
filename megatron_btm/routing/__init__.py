"""Routing: which experts to trust for a sequence.

- `posterior`: the domain posterior p(D=j | x_<t) over the prefix (Bayes rule, with a prior).
- `prior`: the cached prior (DEMix): EMA of last-token posteriors on held-out text; JSON I/O.
- `topk`: keep the k most probable experts (per document from the prior, per token from the
  posterior) and renormalise.

Everything here is pure tensor math except `prior.save_prior` / `prior.load_prior`.
"""

DEFAULT_TEMPERATURE = 0.1
"""T of cluster routing (c-BTM), w_j ∝ exp(−d_j / T); here so that CLI parsers need no torch."""
