"""Export an expert (from a forest) or any checkpoint (e.g. an averaged model) to Hugging Face
format: a GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM folder (by the
model's architecture fields; MistralForCausalLM on request) with the tokenizer, loadable with
`transformers` alone."""
from __future__ import annotations

import argparse

from megatron_btm import cli_args
from megatron_btm.utils.dtypes import DTYPE_NAMES

HELP = "export an expert or averaged model to Hugging Face format (GPT-2, Llama, Qwen2/3, Mistral)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    cli_args.add_checkpoint(parser, group=src, help="checkpoint folder, checkpoints/ root or run folder")
    cli_args.add_forest(parser, group=src, help="forest folder (with --expert)")
    parser.add_argument("--expert", help="expert id in --forest ('seed' for the seed LM)")
    parser.add_argument("--tokenizer", required=True,
                        help="tokenizer.json (or a folder holding one) the model was trained with; "
                             "a folder of HF tokenizer files (an imported checkpoint's root) is "
                             "copied verbatim")
    parser.add_argument("--architecture", default=None,
                        help="HF class to write (e.g. MistralForCausalLM); default: the family "
                             "the model's architecture fields match")
    cli_args.add_output(parser, metavar="DIR", help="new (or empty) output folder")
    parser.add_argument("--dtype", default="fp32", choices=DTYPE_NAMES,
                        help="weight dtype of model.safetensors")
    parser.add_argument("--keep-padded-vocab", action="store_true",
                        help="keep Megatron's vocabulary padding rows instead of slicing the "
                             "embedding to the tokenizer's vocabulary")


def run(args: argparse.Namespace) -> int:
    from megatron_btm.export.hf import ExportConfig, export_checkpoint, export_expert
    if args.forest is not None and not args.expert:
        raise ValueError("--forest needs --expert ID (the expert to export)")
    if args.checkpoint is not None and args.expert:
        raise ValueError("--expert is only valid with --forest (got --checkpoint)")
    config = ExportConfig(dtype=args.dtype, keep_padded_vocab=args.keep_padded_vocab,
                          architecture=args.architecture)
    if args.forest is not None:
        out = export_expert(args.forest, args.expert, tokenizer=args.tokenizer, output=args.output,
                            config=config)
    else:
        out = export_checkpoint(args.checkpoint, tokenizer=args.tokenizer, output=args.output,
                                config=config)
    print(f"exported to {out}")
    return 0
