"""The checkpoint guard: what a training checkpoint holds, when it may be written, and what a
resume accepts.

A checkpoint never replaces the previous one before the state it holds has given a finite
loss (and, unless a dynamic loss scale would skip the update, finite gradients) on the
microstep that follows it -- the very microstep a resume runs first. Divergence often shows
one step late: weights finite but absurd, then a NaN. So a periodic save of a state that has
not run yet is staged (written complete beside the checkpoint) and committed by the next
microstep, which checks it at no extra cost; an explicit save runs that microstep's forward
and backward itself and undoes them. A state gone non-finite is never saved again, and the
error names the checkpoint that holds the last good one."""

import math
from pathlib import Path

import numpy as np

from .checkpoint import (
    TRAINING_CHECKPOINT,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
    stage_checkpoint,
)
from .config import ModelConfig
from .errors import CheckpointError, TrainingDiverged


class CheckpointGuard:
    """The checkpoint protocol of one Trainer (whose state it reads and, on resume, sets).

    ``checked``: the weights have given a finite loss (and finite gradients) since they last
    changed; ``broken``: the state in memory is non-finite and must never be saved;
    ``last_good``: the (path, step) of the last checkpoint known to hold good state;
    ``staged``: a written checkpoint held back until the next microstep has shown its state
    to be good, with its step."""

    def __init__(self, trainer, last_good=None):
        self.trainer = trainer
        self.checked = True
        self.broken = False
        self.last_good = last_good
        self.staged = None

    # -- divergence ----------------------------------------------------------------------------
    def diverged(self, what: str) -> TrainingDiverged:
        """The error for a run gone non-finite; it names the checkpoint that holds the last
        good state (the state in memory is never saved again)."""
        self.broken = True
        self.discard()
        ckpt_path = self.trainer.tc.ckpt_path
        if self.last_good:
            path, step = self.last_good
            where = (f"the last good state is checkpoint {path} (step {step}); resume it with "
                     "a lower --lr")
        elif ckpt_path:
            where = f"no checkpoint was written ({ckpt_path} is untouched)"
        else:
            where = "no checkpoint was written"
        return TrainingDiverged(f"{what}; {where}")

    def refuse_broken(self, then: str):
        if self.broken:
            raise TrainingDiverged(f"the training state is non-finite; {then}")

    # -- the microstep's part ------------------------------------------------------------------
    def weights_changed(self):
        self.checked = False

    def microstep_done(self):
        """A microstep gave a finite loss: it vouches for the weights it ran on, and commits
        the checkpoint staged with them (gradients checked too, unless a dynamic loss scale
        would skip their update)."""
        if self.checked:
            return
        self.checked = True
        if self.staged is not None:
            t = self.trainer
            if not t.optimizer.scale.dynamic and not t.optimizer.grads_finite():
                raise self.diverged(f"gradients are non-finite at step {t.step_count}")
            self.commit()

    # -- saving --------------------------------------------------------------------------------
    def state(self):
        """(meta, arrays) of the trainer's checkpoint: a training checkpoint, or a LoRA
        run's (adapters, their moments and the base's identity; no base weight)."""
        t, opt = self.trainer, self.trainer.optimizer
        run = {
            "train_config": t.tc.to_dict(),
            "step": t.step_count, "updates": opt.updates, "pending": t.pending,
            "loss_scale": opt.scale.value, "clean_updates": opt.scale.clean_updates,
            "dynamic_scale": opt.scale.dynamic, "skipped": opt.scale.skipped,
            "sampler": t.sampler.state_dict(),
            "n_tokens": int(len(t.tokens)), "data": t.data_name,
            "timings_ms": t.totals, "train_ms": t.train_ms,
            # the ranks that trained it (a resume may run on any number)
            "world_size": 1 if t.dp is None else t.dp.size,
        }
        if t.examples is not None:
            run["useful_tokens"] = t.useful_tokens
        if t.model.adapters is not None:
            from .lora import lora_checkpoint_contents
            return lora_checkpoint_contents(
                t.model.adapters, t.base, opt.m, opt.v, run,
                grads=opt.grads if t.pending else None,
                active_ids=t.vocab.active_ids.astype(np.int32))
        meta = {"kind": TRAINING_CHECKPOINT, "model_config": t.mc.to_dict(), **run}
        arrays = {"params": t.model.params, "adam_m": opt.m, "adam_v": opt.v,
                  "active_ids": t.vocab.active_ids.astype(np.int32)}
        if t.pending:  # a checkpoint in the middle of an accumulation keeps its gradients
            arrays["grads"] = t.model.grads
        return meta, arrays

    def _refuse_bad_state(self):
        t = self.trainer
        self.refuse_broken("it is never saved")
        if t.pending and not t.optimizer.scale.dynamic and not t.optimizer.grads_finite():
            raise self.diverged(f"gradients are non-finite at step {t.step_count}")

    def _check_next_microstep(self):
        """Run the next microstep's forward and backward and undo them (data position and
        gradients restored): the state is good if they are finite."""
        t = self.trainer
        if t.pending:
            raise AssertionError("only the state after an update needs this check")
        sampler_state = t.sampler.state_dict()
        try:
            loss, _ = t.next_microstep(t.optimizer.scale.value)
            grads_ok = t.optimizer.scale.dynamic or t.optimizer.grads_finite()
        finally:
            t.model.zero_grad()
            t.sampler.load_state_dict(sampler_state)
        if not math.isfinite(loss):
            raise self.diverged(f"loss is {loss} at step {t.step_count + 1} "
                                "(checked before saving)")
        if not grads_ok:
            raise self.diverged(f"gradients are non-finite at step {t.step_count + 1} "
                                "(checked before saving)")
        self.checked = True

    def save(self, path) -> Path:
        """Write the checkpoint now, after checking the state (see Trainer.save)."""
        path = Path(path)
        self._refuse_bad_state()
        self.discard()
        if not self.checked:
            self._check_next_microstep()
        save_checkpoint(path, *self.state())
        self.last_good = (path, self.trainer.step_count)
        return path

    def save_when_checked(self):
        """The periodic save: written now, put in place once checked. A state that has not
        given a finite loss yet is staged (complete in the temporary beside the checkpoint)
        and committed by the next microstep, which checks it at no extra cost."""
        self._refuse_bad_state()
        ckpt_path = self.trainer.tc.ckpt_path
        if self.checked:
            self.save(ckpt_path)
            return
        self.discard()
        self.staged = (stage_checkpoint(Path(ckpt_path), *self.state()),
                       self.trainer.step_count)

    def commit(self):
        staged, step = self.staged
        self.staged = None
        try:
            staged.commit()
        except OSError as e:
            raise CheckpointError(f"checkpoint {staged.path}: cannot write: "
                                  f"{e.strerror or e}") from None
        self.last_good = (staged.path, step)

    def discard(self):
        if self.staged is not None:
            self.staged[0].discard()
            self.staged = None


# -- resuming ----------------------------------------------------------------------------------
def read_resume_meta(path, model_config=None):
    """(the checkpoint's ModelConfig, its meta) after checking it is a training checkpoint
    (or a LoRA run's) and, when ``model_config`` is given, of that model."""
    from .lora import LORA_CHECKPOINT, read_lora_checkpoint_meta
    meta = read_checkpoint_meta(path)["meta"]
    if meta.get("kind") == LORA_CHECKPOINT:
        meta, saved, _ = read_lora_checkpoint_meta(path)
    elif meta.get("kind") != TRAINING_CHECKPOINT:
        raise CheckpointError(f"checkpoint {path}: not a training checkpoint")
    else:
        saved = ModelConfig.from_dict(meta["model_config"])
    if model_config is not None:
        model_config.require_same(saved, f"checkpoint {path}")
    return saved, meta


def restore(trainer, path, meta):
    """Set a fresh Trainer to a checkpoint's state, after checking that the checkpoint fits
    its data and holds only finite values."""
    t, opt = trainer, trainer.optimizer
    lora = t.model.adapters is not None
    if lora and meta["base"]["hash"] != t.base["hash"]:
        raise CheckpointError(f"checkpoint {path} adapts another base: {t.base['path']}'s "
                              f"weights differ from those of {meta['base']['path']} it was "
                              "trained on")
    shapes = {"adapters" if lora else "params": opt.params, "adam_m": opt.m, "adam_v": opt.v}
    if meta.get("pending"):
        shapes["grads"] = opt.grads
    _, arrays = load_checkpoint(path, into=shapes)
    active = arrays["active_ids"]
    if not np.array_equal(active, t.vocab.active_ids.astype(np.int32)):
        raise CheckpointError(f"checkpoint {path} was trained on other data (its active "
                              f"vocabulary has {len(active)} tokens, this data "
                              f"{t.vocab.n_active}); pass the same --data")
    if meta["n_tokens"] != len(t.tokens):
        raise CheckpointError(f"checkpoint {path} was trained on {meta['n_tokens']} tokens "
                              f"of {meta['data']}, this data has {len(t.tokens)}")
    for name in ("adapters" if lora else "params", "adam_m", "adam_v"):
        if not math.isfinite(t.model.engine.grad_sumsq(arrays[name])):
            raise CheckpointError(f"checkpoint {path}: {name} holds NaN or infinite "
                                  "values (saved from a diverged run)")
    t.sampler.load_state_dict(meta["sampler"])
    t.step_count, opt.updates, t.pending = meta["step"], meta["updates"], meta["pending"]
    opt.scale.restore(meta, path, t.log)
    t.totals = dict(meta["timings_ms"])
    t.train_ms = meta["train_ms"]
    if t.examples is not None:
        t.useful_tokens = meta.get("useful_tokens", 0)
    t.model.weights_changed()
    t.guard.last_good = (Path(path), t.step_count)
