"""What the commands share for their flags: the parser class and the argument types."""

import argparse


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


def add_model_source(p, init_help: str):
    """--ckpt PATH or --init-from PATH (one of them): where the command's model comes from."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", metavar="PATH",
                     help="an anecy training checkpoint, or a LoRA checkpoint (its base, named "
                          "inside it, with the adapters fused)")
    src.add_argument("--init-from", metavar="PATH", help=init_help)


def model_source(args):
    """The ``pretrained.Source`` that --ckpt or --init-from names."""
    from ..pretrained import inspect
    return inspect(args.ckpt, "checkpoint") if args.ckpt else inspect(args.init_from, "init")
