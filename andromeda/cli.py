"""The `andromeda` command: one table of subcommands -> modules.

Each subcommand lives in `andromeda/commands/<name>.py` with `add_arguments(parser)` and
`run(args) -> int`; modules are imported only when their command runs, so `--help` is fast.
A `UserError` (bad input) prints one line on stderr and exits 2; Ctrl-C exits 130; a closed
output pipe ends the command quietly.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

from andromeda.errors import UserError
from andromeda.threads import THREADED_COMMANDS, add_threads_argument, apply_threads, choose_wait_policy

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "presets": ("andromeda.commands.presets", "list the named model configurations"),
    "prepare": ("andromeda.commands.prepare", "tokenize text/JSONL/Parquet/datasets into token shards"),
    "train": ("andromeda.commands.train", "train a model from a preset or config"),
    "eval": ("andromeda.commands.eval", "loss, perplexity and bits per byte of a checkpoint"),
    "generate": ("andromeda.commands.generate", "generate text from a checkpoint"),
    "chat": ("andromeda.commands.chat", "interactive chat with a checkpoint"),
    "serve": ("andromeda.commands.serve", "serve a checkpoint with the OpenAI API (continuous batching)"),
    "convert": ("andromeda.commands.convert",
                "convert between Hugging Face folders and andromeda checkpoints; import x-transformers"),
    "bench": ("andromeda.commands.bench", "benchmarks: prefill, decode, train"),
    "plot": ("andromeda.commands.plot", "plot the loss curves of a training run"),
    "consolidate": ("andromeda.commands.consolidate", "write a sharded (FSDP) checkpoint as an ordinary one"),
    "quantize": ("andromeda.commands.quantize", "int8 / int4 weight-only quantisation of a checkpoint"),
}


def build_parser(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, object]:
    """Top-level parser listing every command; only the command named in argv is imported,
    so one broken or slow-to-import command cannot affect the others (argv None: all are)."""
    parser = argparse.ArgumentParser(
        prog="andromeda",
        description="Build, train, evaluate and run efficient decoder-only language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv or [] if not a.startswith("-")), None)
    module = None
    for name, (module_name, help_text) in COMMANDS.items():
        if name == chosen or (argv is None and importlib.util.find_spec(module_name) is not None):
            module = importlib.import_module(module_name)
            p = sub.add_parser(name, help=help_text, description=module.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
            module.add_arguments(p)
            if name in THREADED_COMMANDS:
                add_threads_argument(p)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if next((a for a in argv if not a.startswith("-")), None) in THREADED_COMMANDS:
        choose_wait_policy()  # before any command imports torch (see andromeda/threads.py)
    parser, module = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None or module is None:
        parser.print_help()
        return 1
    try:
        if args.command in THREADED_COMMANDS:
            apply_threads(args.threads)
        return int(module.run(args) or 0)
    except UserError as e:
        print(f"andromeda {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _reader_went_away()


def _reader_went_away() -> int:
    """The reader of stdout closed the pipe (`andromeda presets | head -2`): stop quietly, as
    a Unix tool does, with the status of a process SIGPIPE ended. stdout goes to /dev/null so
    that the interpreter's final flush does not fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a file (a library caller's stream)
        pass
    return 128 + 13  # SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
