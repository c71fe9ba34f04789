"""anecy train (and train_stories.py / train_qwen.py): train a model, or resume one."""

import argparse
import os
import sys
from pathlib import Path

from .. import backends
from ..config import MPI_TIMEOUT, PRESETS, ModelConfig, TrainConfig
from ..errors import AnecyError
from ._args import non_negative_int, number, positive_int

HELP = "train a model from scratch, from pretrained weights, or resume a checkpoint"

FAMILIES = {
    # family: (presets offered, default preset)
    "stories": (("stories110m", "stories15m", "tiny"), "stories110m"),
    "qwen": (("qwen3-0.6b", "qwen3-tiny"), "qwen3-0.6b"),
}


def family_of(preset: str) -> str:
    for family, (presets, _) in FAMILIES.items():
        if preset in presets:
            return family
    return "stories"


def add_arguments(p, family=None):
    """The training flags. ``family`` (stories | qwen) limits the presets and names the
    default checkpoint (``<family>.ckpt``); None offers every preset."""
    presets, default_preset = FAMILIES[family] if family else (tuple(PRESETS), "stories110m")
    d = TrainConfig()
    p.set_defaults(family=family)
    p.add_argument("--preset", choices=presets,
                   help=f"model shape (default {default_preset}; on --resume, the checkpoint's)")
    p.add_argument("--seq-len", type=positive_int, metavar="N",
                   help="training window in tokens, on every backend (default: the preset's; "
                        "with --init-from and no --preset, 256; on --resume, the checkpoint's)")
    p.add_argument("--steps", type=positive_int,
                   help=f"microsteps to train in all (default {d.steps})")
    p.add_argument("--lr", type=number, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--accum", type=positive_int,
                   help=f"microsteps per optimizer update (default {d.accum})")
    p.add_argument("--warmup", type=non_negative_int,
                   help=f"microsteps of linear warmup (default {d.warmup})")
    p.add_argument("--clip", type=number,
                   help=f"gradient-norm clip, 0 for none (default {d.clip})")
    p.add_argument("--loss-scale", type=_loss_scale, metavar="X|auto",
                   help="static loss scale, or auto: the backend's own (the default: 1 on cpu; "
                        "on the fp16 sim/ane backends a dynamic scale from "
                        f"{backends.DEFAULT_LOSS_SCALE['sim']:g}, halved when "
                        f"gradients overflow, doubled after {d.loss_scale_growth} clean "
                        "updates). On --resume, auto returns a run given a static scale to "
                        "the backend's")
    p.add_argument("--seed", type=non_negative_int,
                   help=f"seed of the initial weights and of data sampling (default {d.seed})")
    p.add_argument("--data", metavar="PATH",
                   help="pretokenized token file, or an examples file of anecy prepare "
                        "--format (default: $ANECY_DATA or ./tinystories_data00.bin, else a "
                        "built-in corpus)")
    ckpt_default = f"{family}.ckpt" if family else "<family>.ckpt: stories.ckpt or qwen.ckpt"
    p.add_argument("--ckpt", metavar="PATH",
                   help=f"checkpoint file (default {ckpt_default})")
    p.add_argument("--ckpt-every", type=non_negative_int, metavar="N",
                   help="microsteps between checkpoints, 0 for only at the end "
                        f"(default {d.ckpt_every})")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run even though --ckpt already exists, replacing it "
                        "(without it, a new run refuses an existing checkpoint)")
    p.add_argument("--scratch", action="store_true",
                   help="start from random weights (the default when not resuming)")
    p.add_argument("--init-from", metavar="PATH",
                   help="start from pretrained weights: a local HF directory (config.json + "
                        "model.safetensors), e.g. a download of Qwen/Qwen3-0.6B, or a llama2.c "
                        ".bin such as stories110M.bin, or an anecy checkpoint (its weights, "
                        "in a new run); "
                        "without --preset the model takes its shape from them (the sequence "
                        "length stays the preset's)")
    p.add_argument("--backend", choices=("auto",) + backends.BACKENDS, default="auto",
                   help="kernel backend (default auto: ane on Apple Silicon, else cpu)")
    p.add_argument("--metrics", metavar="PATH", help="append one JSON line per microstep")
    p.add_argument("--report-to", type=_tracker_names, metavar="LIST",
                   help="also report the metrics (and the configs, as hyperparameters) to "
                        "these experiment trackers, comma-separated: tensorboard, wandb "
                        "(offline unless logged in), or none (default none; on --resume, "
                        "the checkpoint's)")
    p.add_argument("--report-dir", metavar="DIR",
                   help="where the trackers write (default runs/<checkpoint name without "
                        "suffix>)")
    p.add_argument("--eval-every", type=non_negative_int, metavar="N",
                   help=f"microsteps between held-out losses, 0 for never (default {d.eval_every})")
    p.add_argument("--sample-every", type=non_negative_int, metavar="N",
                   help="print a short greedy sample from BOS every N microsteps, 0 for never "
                        f"(default {d.sample_every})")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="decodes the samples (default: the tokenizer the data was prepared "
                        "with; the built-in corpus decodes itself)")
    p.add_argument("--no-compact-vocab", action="store_true",
                   help="softmax over the full vocabulary instead of the tokens in the data")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--mpi-timeout", type=_seconds, metavar="S",
                   help="under mpirun: seconds a rank waits for the others at each exchange "
                        "before it stops the run, naming the ranks that did not come "
                        f"(default {MPI_TIMEOUT:g}; see docs/distributed.md)")
    p.add_argument("--trace", metavar="FILE",
                   help="record a timeline of some microsteps (every kernel call, copy, dW "
                        "job and wait, per thread) and write it to FILE as a Chrome trace for "
                        "Perfetto or chrome://tracing (docs/tracing.md)")
    p.add_argument("--trace-steps", type=_step_range, metavar="STEPS",
                   help="the microsteps of this run --trace records, counted from 1: A-B, or "
                        "one number (default 2-4: after the first, which warms up)")
    add_lora_arguments(p)


def add_lora_arguments(p):
    lora = p.add_argument_group("LoRA", "train low-rank adapters (as PEFT defines them) on "
                                "frozen pretrained weights instead of every weight")
    lora.add_argument("--lora", action="store_true",
                      help="train LoRA adapters; needs --init-from (or --resume of a LoRA "
                           "checkpoint)")
    lora.add_argument("--lora-rank", type=positive_int, metavar="R",
                      help="adapter rank (default 8)")
    lora.add_argument("--lora-alpha", type=number, metavar="A",
                      help="the update is scaled by A / R, as PEFT's lora_alpha (default 2R)")
    lora.add_argument("--lora-targets", metavar="LIST",
                      help="projections to adapt, comma-separated PEFT names (default all: "
                           "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)")
    lora.add_argument("--lora-layers", type=positive_int, metavar="N",
                      help="adapt the last N layers (default all)")
    lora.add_argument("--lora-dropout", type=number, metavar="P",
                      help="dropout on the adapters' input in training (default 0)")
    lora.add_argument("--init-adapter", metavar="DIR",
                      help="start from a PEFT LoRA adapter directory (adapter_config.json + "
                           "adapter_model.safetensors, e.g. one trained with PEFT); its rank, "
                           "alpha, targets and layers are used")


# the flags that size the adapters (a resumed run or --init-adapter brings its own)
_LORA_SHAPE_FLAGS = (("lora_rank", "--lora-rank"), ("lora_alpha", "--lora-alpha"),
                     ("lora_targets", "--lora-targets"), ("lora_layers", "--lora-layers"))

def _lora_config(args, model_config: ModelConfig):
    """The LoraConfig of a new LoRA run: --init-adapter's (checked against the model), or
    the flags'; either checked against the model."""
    from ..lora import LoraConfig, read_peft
    if args.init_adapter:
        given = [flag for name, flag in _LORA_SHAPE_FLAGS if getattr(args, name) is not None]
        if given:
            raise AnecyError(f"--init-adapter brings its own rank, alpha, targets and layers; "
                             f"leave out {given[0]}")
        cfg = read_peft(args.init_adapter, model_config).config
        if args.lora_dropout is not None:
            cfg.dropout = args.lora_dropout
            cfg.validate()
        return cfg
    d = dict(rank=args.lora_rank, alpha=args.lora_alpha, targets=args.lora_targets,
             layers=args.lora_layers, dropout=args.lora_dropout)
    cfg = LoraConfig(**{k: v for k, v in d.items() if v is not None})
    cfg.check(model_config)
    return cfg


def _check_lora_run(args, preset: str, ckpt: str):
    """Every LoRA flag checked against the others and the model, before any work: a bad
    combination is one line. Returns (ModelConfig, LoraConfig) of a LoRA run, or None."""
    lora_given = [flag for name, flag in _LORA_SHAPE_FLAGS + (("lora_dropout", "--lora-dropout"),
                                                              ("init_adapter", "--init-adapter"))
                  if getattr(args, name) is not None]
    resumed_lora = False
    if args.resume and Path(ckpt).exists():
        from ..checkpoint import read_checkpoint_meta
        from ..lora import LORA_CHECKPOINT
        resumed_lora = read_checkpoint_meta(ckpt)["meta"].get("kind") == LORA_CHECKPOINT
    if not args.lora and not resumed_lora:
        if lora_given:
            raise AnecyError(f"{lora_given[0]} needs --lora")
        return None
    if args.scratch:
        raise AnecyError("--lora adapts pretrained weights; it cannot start from --scratch")
    if args.resume:
        if args.init_adapter:
            raise AnecyError("--init-adapter starts a new run; it cannot be combined with "
                             "--resume")
        if not Path(ckpt).exists():
            return None   # the resume path says so
        from ..lora import read_lora_checkpoint_meta
        _, mc, lc = read_lora_checkpoint_meta(ckpt)   # a full-training checkpoint: refused
        shape = [flag for name, flag in _LORA_SHAPE_FLAGS if getattr(args, name) is not None]
        if shape:
            raise AnecyError(f"a resumed LoRA run keeps its checkpoint's adapters; leave out "
                             f"{shape[0]}")
        return mc, lc
    if not args.init_from:
        raise AnecyError("--lora needs pretrained weights to adapt: give --init-from PATH "
                         "(or --resume a LoRA checkpoint)")
    mc = _init_config(args.init_from, ModelConfig.preset(preset),
                      preset if args.preset else None)
    _set_seq_len(mc, args.seq_len)
    lora_cfg = _lora_config(args, mc)
    if lora_cfg.dropout and backends.resolve(args.backend) != "cpu":
        raise AnecyError(f"LoRA dropout {lora_cfg.dropout:g} needs --backend cpu: the sim and "
                         "ane kernels run the merged weight W0 + s B A, which cannot drop the "
                         "adapters' input alone (pass --lora-dropout 0)")
    return mc, lora_cfg


AUTO = "auto"    # --loss-scale auto: the backend's own scale


def _seconds(text):
    value = number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _loss_scale(text):
    """--loss-scale: a finite number, or AUTO."""
    if text == AUTO:
        return AUTO
    try:
        return number(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def _step_range(text):
    """--trace-steps: A-B (1 <= A <= B) or A, as (A, B)."""
    first, _, last = text.partition("-")
    try:
        a, b = int(first), int(last or first)
    except ValueError:
        a = b = 0
    if not 1 <= a <= b:
        raise argparse.ArgumentTypeError(f"expected microsteps A-B with 1 <= A <= B, or one "
                                         f"microstep, got {text!r}")
    return a, b


def _tracker_names(text):
    """--report-to: tracker names, comma-separated, or none."""
    from ..trackers import parse_names
    try:
        return parse_names(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _train_config(args, base: TrainConfig, ckpt: str) -> TrainConfig:
    """`base` (the defaults, or a resumed checkpoint's settings) with the flags given."""
    d = base.to_dict()
    given = dict(steps=args.steps, lr=args.lr, accum=args.accum, warmup=args.warmup,
                 clip=args.clip, seed=args.seed, data_path=args.data,
                 loss_scale=args.loss_scale,
                 ckpt_every=args.ckpt_every, metrics_path=args.metrics,
                 eval_every=args.eval_every, sample_every=args.sample_every,
                 tokenizer=args.tokenizer, trackers=args.report_to,
                 report_dir=args.report_dir)
    d.update({k: v for k, v in given.items() if v is not None})
    if args.loss_scale == AUTO:
        d["loss_scale"] = None
    d["ckpt_path"] = ckpt
    if args.init_from:
        d["init_from"] = args.init_from
    d["backend"] = args.backend
    if args.no_compact_vocab:
        d["compact_vocab"] = False
    return TrainConfig.from_dict(d)


def _init_config(path, preset_config: ModelConfig, preset=None) -> ModelConfig:
    """The model that --init-from's weights fit: the named --preset, checked against them, or
    (no --preset) their own shape with the preset's training sequence length."""
    from ..pretrained import inspect
    theirs = inspect(path, "init").config
    theirs.seq_len = preset_config.seq_len
    if preset is None:
        return theirs
    preset_config.require_same(theirs, path, ModelConfig.WEIGHT_FIELDS,
                               than=f" than --preset {preset}",
                               advice="; leave out --preset to take its shape")
    return preset_config


def _set_seq_len(mc: ModelConfig, seq_len) -> ModelConfig:
    """--seq-len applied to a new run's model. RoPE is computed from rope_theta for any
    position (as HF does), so a checkpoint's own context length (a llama2.c header's, an HF
    config's max_position_embeddings) is no ceiling: training past it is the user's call."""
    if seq_len is not None:
        mc.seq_len = seq_len
        mc.validate()
    return mc


def _inputs(tc: TrainConfig) -> list:
    """The files a run reads besides its checkpoint: none of them may be an output."""
    from ..data import default_data_path, held_out_path, sidecar_path
    data = tc.data_path or (default_data_path() if default_data_path().exists() else None)
    files = [tc.init_from, tc.tokenizer]
    if data:
        files += [data, sidecar_path(data)]
        try:
            val = held_out_path(data)
        except AnecyError:   # a corrupt sidecar: the data loader says so, in its words
            val = None
        if val is not None:
            files += [val, sidecar_path(val)]
    return [f for f in files if f]


def _check_outputs(tc: TrainConfig) -> None:
    """The run's checkpoint and metrics file, vetted before any work (see
    ``fileio.check_writable``)."""
    from ..fileio import check_writable, same_file
    inputs = _inputs(tc)
    check_writable(tc.ckpt_path, what="checkpoint", make_parents=True, inputs=inputs)
    if tc.metrics_path:
        check_writable(tc.metrics_path, what="metrics file", append=True,
                       inputs=inputs + [tc.ckpt_path])
        if Path(tc.metrics_path).resolve() == Path(tc.ckpt_path).resolve() \
                or same_file(tc.metrics_path, tc.ckpt_path):
            raise AnecyError(f"--metrics {tc.metrics_path} is the checkpoint; name another "
                             "file")


def _check_trace(path, tc: TrainConfig) -> None:
    """--trace FILE, vetted before any work: writable, and none of the run's other files."""
    from ..fileio import check_writable, same_file
    others = [tc.ckpt_path, tc.metrics_path]
    check_writable(path, what="trace file", inputs=_inputs(tc) + others)
    for other in others:
        if other and (Path(path).resolve() == Path(other).resolve() or same_file(path, other)):
            raise AnecyError(f"--trace {path} is also an output of the run ({other}); name "
                             "another file")


def _hold_outputs(tc: TrainConfig, stack) -> None:
    """Lock the checkpoint and the metrics file for the run's whole life (``runlock``):
    a second run on either is refused, naming this one's PID."""
    import stat

    from ..runlock import held
    stack.enter_context(held(tc.ckpt_path, "checkpoint"))
    if tc.metrics_path:
        try:
            special = not stat.S_ISREG(Path(tc.metrics_path).stat().st_mode)
        except OSError:
            special = False
        if not special:   # /dev/null: nothing to interleave, and no lock file in /dev
            stack.enter_context(held(tc.metrics_path, "metrics file"))


def run(args) -> int:
    from ..distributed import Group
    group = Group.from_environment(args.mpi_timeout or MPI_TIMEOUT,
                                   prog=getattr(args, "_prog", None) or "anecy train")
    try:
        return _run(args, group)
    except AnecyError as e:
        if group is not None and group.rank != 0 and group.joined:
            e.quiet = True   # the ranks share the state, and the error: rank 0 says it
        raise


def _run(args, group) -> int:
    from contextlib import ExitStack

    from .. import corpus
    from ..checkpoint import read_checkpoint_meta
    from ..trainer import Trainer, prepare_outputs
    if group is not None and group.rank != 0:
        # the other ranks only compute: rank 0 prints and writes
        sys.stdout = open(os.devnull, "w")
    family = args.family
    default_preset = FAMILIES[family][1] if family else "stories110m"
    preset = args.preset or default_preset
    ckpt = args.ckpt or f"{family or family_of(preset)}.ckpt"
    if args.resume and args.scratch:
        raise AnecyError("--resume and --scratch contradict each other")
    if args.init_from and (args.resume or args.scratch):
        raise AnecyError("--init-from starts a new run; it cannot be combined with "
                         "--resume or --scratch")
    if args.overwrite and args.resume:
        raise AnecyError("--overwrite starts a new run over the checkpoint; it cannot be "
                         "combined with --resume")
    backends.resolve(args.backend)
    if args.trace_steps and not args.trace:
        raise AnecyError("--trace-steps says which microsteps --trace records; give --trace "
                         "FILE too")
    lora_run = _check_lora_run(args, preset, ckpt)
    if args.tokenizer:   # a bad path fails now, not at the first sample
        from ..tokenizer import load
        load(args.tokenizer)
    if args.resume:
        if not Path(ckpt).exists():
            raise AnecyError(f"no checkpoint at {ckpt} to resume from (train without "
                             "--resume first, or name one with --ckpt)")
        meta = read_checkpoint_meta(ckpt)["meta"]
        saved = meta.get("train_config", {})
        saved_len = meta.get("model_config", {}).get("seq_len")
        if args.seq_len is not None and saved_len is not None and args.seq_len != saved_len:
            raise AnecyError(f"{ckpt} trains on windows of {saved_len} tokens; a resumed run "
                             f"keeps them (leave out --seq-len {args.seq_len})")
        tc = _train_config(args, TrainConfig.from_dict(saved), ckpt)
    else:
        tc = _train_config(args, TrainConfig(), ckpt)
    writes = group is None or group.rank == 0
    if writes:
        _check_outputs(tc)
    if args.trace:
        _check_trace(args.trace, tc)
    with ExitStack() as stack:
        if writes:
            _hold_outputs(tc, stack)
        if not args.resume and not args.overwrite and os.path.lexists(ckpt):
            raise AnecyError(f"{ckpt} already exists: resume it with --resume, or pass "
                             "--overwrite to start over")
        if writes:
            prepare_outputs(tc)  # before any long work: a run must not be computed, then lost
        if args.resume:
            given = ModelConfig.preset(args.preset) if args.preset else None
            trainer = Trainer.resume(ckpt, tc, model_config=given, group=group)
        else:
            mc = ModelConfig.preset(preset)
            if args.init_from:
                mc = _init_config(args.init_from, mc, preset if args.preset else None)
            mc = _set_seq_len(mc, args.seq_len)
            if lora_run is not None:
                trainer = Trainer(lora_run[0], tc, lora=lora_run[1],
                                  init_adapter=args.init_adapter, group=group)
            else:
                trainer = Trainer(mc, tc, group=group)
        if trainer.model.config.vocab_size > 32000 and trainer.data_name == corpus.NAME:
            print("note: the built-in corpus is written in Llama-2 token ids; for a Qwen3 "
                  "model that means something, pass data pretokenized with Qwen3's tokenizer "
                  "(--data)")
        trace = None
        if args.trace:
            from ..timeline import TraceWindow
            trace = TraceWindow(args.trace, *(args.trace_steps or (2, 4)),
                                rank=None if group is None else group.rank)
        summary = trainer.run(progress=not args.no_progress, trace=trace)
    return 130 if summary["interrupted"] else 0
