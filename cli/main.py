"""`fleetmind`: one program, a subcommand per capability, each registered by its own side.

This module holds no command: it builds the top-level parser, asks every group in
`COMMAND_GROUPS` to add its commands, and reports bad input. Heavy libraries (torch,
transformers) are imported inside the commands that need them, so `fleetmind --help` and
the aggregator's commands run on an install without torch. A command reports bad input by
raising `argparse.ArgumentError(None, message)`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

# Each side registers its own commands: "module:function", the function taking the
# top-level subparsers. A new group is one line here (in the order `--help` lists them).
COMMAND_GROUPS: list[str] = [
    "fleetmind.client.cli:add_client_commands",
    "fleetmind.server.cli:add_server_commands",
    "fleetmind.audit.cli:add_audit_commands",
    "fleetmind.sim.cli:add_sim_commands",
]


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line naming the problem, then exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def command_group(entry: str) -> Callable[[Any], None]:
    """The registration function named by a `COMMAND_GROUPS` entry ("module:function")."""
    module, _, function = entry.partition(":")
    register: Callable[[Any], None] = getattr(importlib.import_module(module), function)
    return register


def build_parser() -> Parser:
    parser = Parser(prog="fleetmind", description="Federated continual learning for deployed "
                    "language models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=Parser)
    for entry in COMMAND_GROUPS:
        command_group(entry)(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except argparse.ArgumentError as error:
        # Every command group reports bad input this way (stdlib, so no side needs anything
        # from this module): one line, exit status 2.
        print(f"fleetmind: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
