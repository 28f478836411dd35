"""Export an expert or an averaged model to Hugging Face `transformers` format (GPT-2 layout).

    from megatron_btm.export import ExportConfig, export_checkpoint, export_expert
    export_checkpoint("run/checkpoints", tokenizer="data/tokenizer.json", output="hf/legal")
    export_expert(forest_root, "legal-c1", tokenizer=..., output=...)

Our architecture (Megatron GPTModel, local spec: pre-LN, exact-erf GeLU, biases, learned absolute
positions, final LN, tied embeddings by default) is GPT-2's, so the export is a key mapping plus
the fused-QKV reorder; see `gpt2.py`. Torch is imported lazily (`btm --help` stays fast).
"""
from megatron_btm.export.hf import ExportConfig, export_checkpoint, export_expert

__all__ = ["ExportConfig", "export_checkpoint", "export_expert"]
