"""Parameter averaging: θ = Σ_j a_j θ_j over experts of a forest.

- `methods`: the registry of pure weight methods (uniform, weighted, argmax, posterior, topk)
  and `merge_tensors` (fp32 accumulation, output in the input dtype).
- `torch_dist`: streaming reader/writer of Megatron torch_dist (PyTorch DCP) checkpoints, one
  tensor at a time.
- `apply`: `average_checkpoints`, the streaming applier (checks, then read-accumulate-write).
"""
