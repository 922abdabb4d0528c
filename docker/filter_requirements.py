#!/usr/bin/env python3
"""Turn the project's requirements.txt into what a GPU base image should install.

NGC PyTorch images (25.03 and later) ship /etc/pip/constraint.txt pinning every Python package
NVIDIA built the image with, torch included; a pin of ours that differs makes pip fail (or, without
the constraints, replace NVIDIA's CUDA build of torch / numpy with a PyPI one). So:

* requirements: drop torch (the image's build is kept), dev-only tools named with --drop, and,
  unless --ignore-base-constraints 1, every package the image already pins: the image's version wins.
* constraints: the image's constraint file (when honoured) plus `torch==<installed version>`, so
  nothing in the install can swap torch out even when the base constraints are ignored.

Standard library only: it runs in the image before anything of the project is installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys
from pathlib import Path

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def normalize(name: str) -> str:
    """PEP 503 name normalisation: scikit_learn, Scikit.Learn -> scikit-learn."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(line: str) -> str | None:
    """The package name of one requirements line, or None for blanks, comments and pip options."""
    line = line.split("#", 1)[0].strip()
    if not line or line.startswith("-"):
        return None
    m = _NAME.match(line)
    return normalize(m.group(1)) if m else None


def pinned_names(lines: list[str]) -> set[str]:
    return {n for n in map(requirement_name, lines) if n}


def filter_requirements(lines: list[str], drop: set[str]) -> tuple[list[str], list[str]]:
    """Split requirement lines into (kept, dropped) by normalised package name; comments go."""
    drop = {normalize(d) for d in drop}
    kept, dropped = [], []
    for raw in lines:
        name = requirement_name(raw)
        if name is None:
            continue
        (dropped if name in drop else kept).append(raw.split("#", 1)[0].strip())
    return kept, dropped


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("requirements", type=Path)
    p.add_argument("--drop", nargs="*", default=[], help="package names never to install (torch is always dropped)")
    p.add_argument("--base-constraints", type=Path, default=Path("/etc/pip/constraint.txt"),
                   help="the base image's pip constraint file; ignored when it does not exist")
    p.add_argument("--ignore-base-constraints", choices=["0", "1"], default="0",
                   help="1: let the project's pins win over the base image's (torch stays pinned)")
    p.add_argument("--out-requirements", type=Path, required=True)
    p.add_argument("--out-constraints", type=Path, required=True)
    args = p.parse_args(argv)

    if not args.requirements.is_file():
        p.error(f"no requirements file at {args.requirements}")
    req_lines = args.requirements.read_text().splitlines()
    base_lines: list[str] = []
    if args.ignore_base_constraints == "0" and args.base_constraints.is_file():
        base_lines = args.base_constraints.read_text().splitlines()

    drop = {"torch", *args.drop} | pinned_names(base_lines)
    kept, dropped = filter_requirements(req_lines, drop)

    constraints = [ln for ln in base_lines if requirement_name(ln)]
    torch_version = installed_version("torch")
    if torch_version:
        constraints.append(f"torch=={torch_version}")

    args.out_requirements.write_text("".join(f"{ln}\n" for ln in kept))
    args.out_constraints.write_text("".join(f"{ln}\n" for ln in constraints))
    print(f"[filter_requirements] installing {len(kept)} requirements; kept from the base image or "
          f"dropped: {', '.join(dropped) or 'none'}; torch pinned to {torch_version or '(not installed)'}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
