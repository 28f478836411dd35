"""Export an expert or an averaged model to Hugging Face `transformers` format.

    from megatron_btm.export import ExportConfig, export_checkpoint, export_expert
    export_checkpoint("run/checkpoints", tokenizer="data/tokenizer.json", output="hf/legal")
    export_expert(forest_root, "legal-c1", tokenizer=..., output=...)

The HF class follows the model's architecture fields (`megatron.model.GPTConfig`): GPT-2
(`arch: gpt2`, the default), Llama (`llama`; Mistral on request or for a Mistral import), Qwen2,
Qwen3. Each family is one mapping table (`megatron_btm.hf.mapping`) that `btm import-hf` reads
the other way; `gpt2.py` keeps GPT-2-specific helpers over it. Torch is imported lazily
(`btm --help` stays fast).
"""
from megatron_btm.export.hf import ExportConfig, export_checkpoint, export_expert

__all__ = ["ExportConfig", "export_checkpoint", "export_expert"]
