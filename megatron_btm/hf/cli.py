"""Import a Hugging Face model folder (config.json + safetensors or pytorch_model.bin) as a
megatron-btm torch_dist checkpoint, with its tokenizer files beside it. Supported:
GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM.
A Megatron-LM `--save` folder (latest_checkpointed_iteration.txt + iter_NNNNNNN/, torch_dist) is
recognised and imported too (docs/INTEROP.md)."""
from __future__ import annotations

import argparse

from megatron_btm import cli_args
from megatron_btm.utils.dtypes import DTYPE_NAMES

HELP = "import a Hugging Face model (GPT-2, Llama, Mistral, Qwen2, Qwen3) as a checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_dir", metavar="HF_DIR",
                        help="Hugging Face model folder (config.json + weights), or a Megatron-LM "
                             "--save folder (latest_checkpointed_iteration.txt)")
    cli_args.add_output(parser, metavar="DIR", help="new (or empty) checkpoint folder")
    parser.add_argument("--tp", type=int, default=1,
                        help="tensor-parallel size the model will run at (checked; the checkpoint "
                             "loads at any TP/PP)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (checked)")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="model.seq_length (training length) of a RoPE model; default: "
                             "config.json's max_position_embeddings")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES],
                        help="stored dtype (auto: as in the HF files)")
    parser.add_argument("--no-torch-free", action="store_true",
                        help="write through torch even where the torch-free writer applies "
                             "(safetensors, dtypes kept); both write the same checkpoint")


def run(args: argparse.Namespace) -> int:
    from megatron_btm.hf.importer import import_hf
    from megatron_btm.hf.megatron_lm import import_megatron_lm, is_megatron_lm
    from megatron_btm.utils.io import read_json
    if is_megatron_lm(args.hf_dir):
        if args.seq_length is not None:
            raise ValueError("--seq-length: a Megatron-LM checkpoint's args fix it")
        out = import_megatron_lm(args.hf_dir, args.output, dtype=args.dtype)
    else:
        out = import_hf(args.hf_dir, args.output, tp=args.tp, pp=args.pp, dtype=args.dtype,
                        seq_length=args.seq_length, torch_free=not args.no_torch_free)
    meta = read_json(out / (out / "latest").read_text().strip() / "meta.json")  # no torch import
    cfg, source = meta["model_config"], meta["imported_from"]
    what = source.get("architecture") or f"Megatron-LM iteration {source['iteration']}"
    print(f"imported {what} as model.arch={cfg['arch']} "
          f"({cfg['num_layers']} layers, hidden {cfg['hidden_size']}, vocab {cfg['vocab_size']}) "
          f"to {out}")
    return 0
