"""python -m finetune --task sst2 --model DIR [--data DIR] --lr 2e-5 --seed 1 --output DIR

One finetuning run (GLUE task or SQuAD). Prints the dev metrics; writes <output>/result.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from finetune.cli_args import add_config_flags, config_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m finetune", description=__doc__.split("\n\n")[1],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from finetune.api import finetune
    try:
        cfg = config_from_args(args)
        result = finetune(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"task": result["task"], "lr": result["lr"], "seed": result["seed"],
                      "score": result["score"], "metrics": result["metrics"],
                      "output": cfg.output}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
