"""The command line: ``anecy <command>`` (also ``python -m anecy``), and the train_*.py scripts.

Each command is a module of ``anecy.commands`` with ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args) -> int``. Every user error ends with one line on stderr and exit status 2,
never a traceback; Ctrl-C ends with status 130."""

import argparse
import importlib
import sys

from .commands._args import Parser
from .errors import AnecyError

# command name -> module in anecy.commands, in the order `anecy --help` lists them
COMMANDS = ("train", "prepare", "download", "plot", "sample", "chat", "export", "eval",
            "selftest", "bench")


def run_command(prog: str, run, args) -> int:
    """``run(args)``, with user errors turned into one line on stderr and status 2."""
    try:
        return run(args)
    except AnecyError as e:
        if not getattr(e, "quiet", False):   # a refused data-parallel start: rank 0 says it
            print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"{prog}: error: out of memory", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `anecy sample ... | head`
        return 0


def _command(name):
    return importlib.import_module(f".commands.{name}", __package__)


def build_parser(command=None) -> argparse.ArgumentParser:
    """The parser of every command, or (``command``) of that one only: the others' modules,
    some of which load the engine, are then not imported."""
    from . import __version__
    p = Parser(prog="anecy", description="Train Llama-family transformers on one machine: "
               "prepare data, train, sample, export.")
    p.add_argument("--version", action="version", version=f"anecy {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in COMMANDS:
        if command is not None and name != command:
            sub.add_parser(name)
            continue
        module = _command(name)
        c = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(c)
        c.set_defaults(_run=module.run, _prog=f"anecy {name}")
    return p


def anecy_main(argv=None) -> int:
    """The ``anecy`` console script."""
    words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    parser = build_parser(words[0] if words and words[0] in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return run_command(args._prog, args._run, args)


def main(argv=None, family: str = "stories") -> int:
    """train_<family>.py: ``anecy train`` with that family's presets and checkpoint name."""
    from .commands import train
    parser = Parser(prog=f"train_{family}.py",
                    description=f"Train a {family} model with anecy (CPU backend here; the Apple "
                                "Neural Engine on Apple Silicon).")
    train.add_arguments(parser, family=family)
    parser.set_defaults(_prog=parser.prog)
    args = parser.parse_args(argv)
    return run_command(parser.prog, train.run, args)
