"""The command line: ``anecy <command>`` (also ``python -m anecy``), and the train_*.py scripts.

Each command is a module of ``anecy.commands`` with ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args) -> int``. Every user error ends with one line on stderr and exit status 2,
never a traceback; Ctrl-C ends with status 130."""

import argparse
import importlib
import sys

from .errors import AnecyError

# command name -> module in anecy.commands, in the order `anecy --help` lists them
COMMANDS = ("train", "prepare", "download", "plot", "sample", "chat", "export", "selftest")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and status 2, as for every other bad input
        self.exit(2, f"{self.prog}: error: {message}\n")


def integer(minimum, what):
    """An argparse type: an integer >= minimum (``what`` describes it in the error)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what} integer, got {text!r}")
        return value
    return parse


positive_int = integer(1, "a positive")
non_negative_int = integer(0, "a non-negative")


def number(text):
    """An argparse type: a finite float."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def run_command(prog: str, run, args) -> int:
    """``run(args)``, with user errors turned into one line on stderr and status 2."""
    try:
        return run(args)
    except AnecyError as e:
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


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    p = Parser(prog="anecy", description="Train Llama-family transformers on one machine: "
               "prepare data, train, sample, export.")
    p.add_argument("--version", action="version", version=f"anecy {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in COMMANDS:
        module = _command(name)
        c = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(c)
        c.set_defaults(_run=module.run, _prog=f"anecy {name}")
    return p


def anecy_main(argv=None) -> int:
    """The ``anecy`` console script."""
    parser = build_parser()
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
    args = parser.parse_args(argv)
    return run_command(parser.prog, train.run, args)
