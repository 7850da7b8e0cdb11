"""The `energon` command: run | serve | client | bench | worker."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each subcommand lives in its own module with `add_arguments(parser)` and `main(args) -> int`,
# imported only when chosen so that `energon --help` stays fast.
SUBCOMMANDS = {
    "run": ("energon.commands.run", "generate text from a prompt with a model or preset"),
    "bench": ("energon.bench.cli", "measure Energon against its baselines and the hardware limit"),
    "worker": ("energon.actors.launch", "start one worker that joins a controller over tcp://"),
    "serve": ("energon.server.serve", "serve a model over ZeroMQ and OpenAI-compatible HTTP"),
    "client": ("energon.server.client_cli", "send prompts to `energon serve --zmq ...`"),
    "keygen": ("energon.server.keys", "make a CURVE key pair and an API key for `energon serve`"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="energon", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
        else:
            p.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    return importlib.import_module(SUBCOMMANDS[args.command][0]).main(args) or 0


if __name__ == "__main__":
    sys.exit(main())
