#!/usr/bin/env python
"""Export an expert or averaged model to Hugging Face format (same as `btm export-hf`).

    python tools/export_hf.py --forest FOREST --expert legal-c1 --tokenizer tok.json --output hf/legal
    python tools/export_hf.py --checkpoint averaged/ --tokenizer tok.json --output hf/avg --dtype bf16
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_btm.export import cli  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="export_hf.py", description=cli.__doc__)
    cli.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cli.run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"export_hf.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
