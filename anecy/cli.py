"""Command line of train_stories.py (and the other train_*.py scripts).

Every user error ends with one line on stderr and exit status 2, never a traceback."""

import argparse
import sys
from pathlib import Path

from . import backends
from .checkpoint import read_checkpoint_meta
from .config import ModelConfig
from .errors import AnecyError
from .trainer import TrainConfig, Trainer

FAMILIES = {
    # family: (presets offered, default preset)
    "stories": (("stories110m", "stories15m", "tiny"), "stories110m"),
    "qwen": (("qwen3-0.6b", "qwen3-tiny"), "qwen3-0.6b"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and status 2, as for every other bad input
        self.exit(2, f"{self.prog}: error: {message}\n")


def _integer(minimum, what):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what} integer, got {text!r}")
        return value
    return parse


_positive_int = _integer(1, "a positive")
_non_negative_int = _integer(0, "a non-negative")


def _number(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def build_parser(family: str) -> argparse.ArgumentParser:
    presets, default_preset = FAMILIES[family]
    d = TrainConfig()
    p = _Parser(prog=f"train_{family}.py",
                description=f"Train a {family} model with anecy (CPU backend here; the Apple "
                            "Neural Engine on Apple Silicon).")
    p.add_argument("--preset", choices=presets,
                   help=f"model shape (default {default_preset}; on --resume, the checkpoint's)")
    p.add_argument("--steps", type=_positive_int,
                   help=f"microsteps to train in all (default {d.steps})")
    p.add_argument("--lr", type=_number, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--accum", type=_positive_int,
                   help=f"microsteps per optimizer update (default {d.accum})")
    p.add_argument("--warmup", type=_non_negative_int,
                   help=f"microsteps of linear warmup (default {d.warmup})")
    p.add_argument("--clip", type=_number,
                   help=f"gradient-norm clip, 0 for none (default {d.clip})")
    p.add_argument("--loss-scale", type=_number, metavar="X",
                   help="static loss scale (default: 1 on cpu, 4096 on the fp16 sim/ane "
                        "backends)")
    p.add_argument("--seed", type=_non_negative_int,
                   help="seed of the initial weights and of data sampling (default 0)")
    p.add_argument("--data", metavar="PATH",
                   help="pretokenized uint16 token file (default: $ANECY_DATA or "
                        "./tinystories_data00.bin, else a built-in corpus)")
    p.add_argument("--ckpt", metavar="PATH", default=f"{family}.ckpt",
                   help=f"checkpoint file (default {family}.ckpt)")
    p.add_argument("--ckpt-every", type=_non_negative_int, metavar="N",
                   help="microsteps between checkpoints, 0 for only at the end (default 100)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    p.add_argument("--scratch", action="store_true",
                   help="start from random weights (the default when not resuming)")
    p.add_argument("--backend", choices=("auto",) + backends.BACKENDS, default="auto",
                   help="kernel backend (default auto: ane on Apple Silicon, else cpu)")
    p.add_argument("--metrics", metavar="PATH", help="append one JSON line per microstep")
    p.add_argument("--eval-every", type=_non_negative_int, metavar="N",
                   help="microsteps between held-out losses, 0 for never (default 0)")
    p.add_argument("--no-compact-vocab", action="store_true",
                   help="softmax over the full vocabulary instead of the tokens in the data")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    if family == "qwen":
        p.add_argument("--init-from", metavar="HF_DIR",
                       help="start from the weights of a local HF directory (config.json + "
                            "model.safetensors), e.g. a download of Qwen/Qwen3-0.6B")
    return p


def _train_config(args, base: TrainConfig) -> TrainConfig:
    """`base` (the defaults, or a resumed checkpoint's settings) with the flags given."""
    d = base.to_dict()
    given = dict(steps=args.steps, lr=args.lr, accum=args.accum, warmup=args.warmup,
                 clip=args.clip, seed=args.seed, data_path=args.data,
                 loss_scale=args.loss_scale,
                 ckpt_every=args.ckpt_every, metrics_path=args.metrics,
                 eval_every=args.eval_every)
    d.update({k: v for k, v in given.items() if v is not None})
    d["ckpt_path"] = args.ckpt
    if getattr(args, "init_from", None):
        d["init_from"] = args.init_from
    d["backend"] = args.backend
    if args.no_compact_vocab:
        d["compact_vocab"] = False
    return TrainConfig.from_dict(d)


def main(argv=None, family: str = "stories") -> int:
    parser = build_parser(family)
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        if args.resume and args.scratch:
            raise AnecyError("--resume and --scratch contradict each other")
        if getattr(args, "init_from", None) and (args.resume or args.scratch):
            raise AnecyError("--init-from starts a new run; it cannot be combined with "
                             "--resume or --scratch")
        backends.resolve(args.backend)
        preset = args.preset or FAMILIES[family][1]
        if args.resume:
            if not Path(args.ckpt).exists():
                raise AnecyError(f"no checkpoint at {args.ckpt} to resume from (train without "
                                 "--resume first, or name one with --ckpt)")
            saved = read_checkpoint_meta(args.ckpt)["meta"].get("train_config", {})
            tc = _train_config(args, TrainConfig.from_dict(saved))
            given = ModelConfig.preset(args.preset) if args.preset else None
            trainer = Trainer.resume(args.ckpt, tc, model_config=given)
        else:
            trainer = Trainer(ModelConfig.preset(preset),
                              _train_config(args, TrainConfig(ckpt_every=100)))
        if family == "qwen" and trainer.data_name == "built-in corpus":
            print("note: the built-in corpus is written in Llama-2 token ids; for a Qwen3 "
                  "model that means something, pass data pretokenized with Qwen3's tokenizer "
                  "(--data)")
        summary = trainer.run(progress=not args.no_progress)
    except AnecyError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"{prog}: error: out of memory for this model", file=sys.stderr)
        return 2
    return 130 if summary["interrupted"] else 0
