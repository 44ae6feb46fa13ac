"""The ``loom`` command line: ``loom --version``, ``loom doctor``; later ``inspect``, ``delta``, ``library``,
``bench``. Each sub-command lives in its own module and registers itself with :func:`main`'s parser."""
from __future__ import annotations

import argparse
import logging
import sys

from ..version import __version__


def build_parser() -> argparse.ArgumentParser:
    from ..playground import train as playground_train
    from . import bench, delta, doctor, inspect, library

    parser = argparse.ArgumentParser(prog="loom", description="LoRA Loom: compose Flux LoRAs in ComfyUI.")
    parser.add_argument("--version", action="version", version=f"lora-loom {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug output")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (doctor, inspect, delta, library, bench, playground_train):
        module.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    return int(args.run(args) or 0)
