"""`energon bench SCENARIO`: each scenario is a module in energon/bench with add_arguments/main."""

from __future__ import annotations

import argparse
import importlib

SCENARIOS = {
    "actors": "energon.bench.actors",
    "allreduce": "energon.bench.allreduce",
    "forward": "energon.bench.forward",
    "gemv": "energon.bench.gemv",
    "generate": "energon.bench.generate",
    "paged-attention": "energon.bench.paged_attention",
    "paged-prefill": "energon.bench.paged_prefill",
    "pipeline": "energon.bench.pipeline",
    "pool": "energon.bench.pool",
    "prefix": "energon.bench.prefix",
    "sampler": "energon.bench.sampler",
    "serve": "energon.bench.serve",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="scenario", required=True)
    for name, module in SCENARIOS.items():
        importlib.import_module(module).add_arguments(sub.add_parser(name))


def main(args: argparse.Namespace) -> int:
    return importlib.import_module(SCENARIOS[args.scenario]).main(args) or 0
