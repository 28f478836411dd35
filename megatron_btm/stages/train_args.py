"""Arguments shared by `btm train-seed` and `btm train-expert`."""
from __future__ import annotations

import argparse


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="training YAML (model, parallel, optim, steps, batch sizes, "
                        "logging); a `train:` section is used when present. Defaults apply without it")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set steps=200 --set model.num_layers=4")
    parser.add_argument("--data", required=True, help="preprocessed data folder (from `btm preprocess`)")
    parser.add_argument("--output", required=True, help="run folder (checkpoints, logs, stage.json)")
    parser.add_argument("--resume", choices=("auto", "none"), default="auto",
                        help="auto: continue from the run folder's latest complete checkpoint if "
                        "any; none: start fresh (refuses a folder with checkpoints)")


def load_config(args):
    from megatron_btm.training.config import TrainConfig
    return TrainConfig.from_yaml(args.config, args.overrides)


def split_list(value: str, what: str) -> list[str]:
    items = [x.strip() for x in value.split(",") if x.strip()]
    if not items:
        raise ValueError(f"{what}: empty list")
    return items
