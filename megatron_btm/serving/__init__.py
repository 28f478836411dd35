"""Serving a forest: route first, then run only the chosen experts (DESIGN.md "Serving").

- `kv`: a KV cache per expert through Megatron-Core's StaticInferenceContext.
- `pool`: experts loaded on demand, at most `capacity` models in memory (an LRU).
- `route`: which k experts a document uses: the top k of a domain's cached prior, or of the
  posterior over the first P tokens (every expert scores those P tokens once).
- `routed`: `btm eval --route` and `btm generate --topk`: perplexity / text and their cost.

The evaluation tables that score every expert (inference/) stay the research view.
"""
