"""The training loop: microsteps, accumulation, clipping, AdamW, the LR schedule,
checkpoints and metrics.

Counting: ``steps`` are microsteps (one sequence each); every ``accum`` microsteps
(and after the last one) the optimizer updates the weights. Warmup and the cosine
decay are measured in microsteps too, so the schedule does not depend on ``accum``."""

import json
import math
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import numpy as np

from . import backends
from .checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint, stage_checkpoint
from .config import ModelConfig, TrainConfig, step_flops
from .corpus import BUILTIN_NOTICE, builtin_tokens
from .data import TokenSampler, VocabMap, default_data_path, open_held_out, open_tokens
from .errors import AnecyError, CheckpointError, ConfigError, DataError, OutputError
from .fileio import check_writable, remove_leftovers
from .model import Model
from .timers import REPORT_ORDER

CHECKPOINT_KIND = "anecy-train"


class TrainingDiverged(AnecyError):
    """The loss, the gradient, a parameter or an Adam moment became NaN or infinite."""


def prepare_outputs(tc: TrainConfig, log=print) -> None:
    """Before any long work: remove the temporaries that killed saves of this checkpoint
    left behind, and check that the checkpoint and metrics files can be written (an
    OutputError, one line, otherwise)."""
    if tc.ckpt_path:
        for p in remove_leftovers(tc.ckpt_path):
            log(f"removed {p} (left by an interrupted save)")
        check_writable(tc.ckpt_path, what="checkpoint", make_parents=True)
    if tc.metrics_path:
        check_writable(tc.metrics_path, what="metrics file", append=True)


@dataclass
class StepRecord:
    """What one microstep did. `grad_norm` is set on microsteps that updated the weights."""
    step: int
    loss: float
    lr: float
    ms: float
    tokens_per_s: float
    updated: bool
    grad_norm: Optional[float] = None
    skipped: bool = False          # the update was skipped: fp16 gradients overflowed
    loss_scale: float = 1.0
    val_loss: Optional[float] = None
    timings: dict = field(default_factory=dict)   # ms of this microstep per component

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def load_training_data(cfg: ModelConfig, data_path=None):
    """(tokens, description, notice): the named file, else the default TinyStories file,
    else the built-in corpus (with a notice saying how to get TinyStories)."""
    if data_path is not None:
        return open_tokens(data_path, cfg.vocab_size, cfg.seq_len), str(data_path), None
    path = default_data_path()
    if path.exists():
        return open_tokens(path, cfg.vocab_size, cfg.seq_len), str(path), None
    if cfg.vocab_size < 32000:
        raise DataError(f"no token file at {path}, and the built-in corpus needs the Llama-2 "
                        f"vocabulary (32000 tokens; this model has {cfg.vocab_size})")
    return builtin_tokens(), "built-in corpus", BUILTIN_NOTICE


class Trainer:
    """Trains a Model on a token file.

    >>> t = Trainer(ModelConfig.preset("tiny"), TrainConfig(steps=20))
    >>> t.run()                 # or: rec = t.step() for one microstep
    """

    def __init__(self, model_config: ModelConfig, train_config: TrainConfig, *,
                 tokens=None, log=print, _resume_state=None):
        if not isinstance(model_config, ModelConfig) or not isinstance(train_config, TrainConfig):
            raise ConfigError("Trainer needs a ModelConfig and a TrainConfig")
        model_config.validate()
        train_config.validate()
        self.mc, self.tc, self.log = model_config, train_config, log
        self.backend = backends.resolve(train_config.backend)
        # fp16 backends scale the loss dynamically unless a static scale is given; the
        # scale and its clean-update counter are part of the training state (checkpoints)
        self.dynamic_scale = (train_config.loss_scale is None
                              and backends.DYNAMIC_LOSS_SCALE[self.backend])
        self.loss_scale = (train_config.loss_scale if train_config.loss_scale is not None
                           else backends.DEFAULT_LOSS_SCALE[self.backend])
        self.clean_updates = 0       # updates since the dynamic scale last changed
        self.skipped = 0             # updates skipped because fp16 gradients overflowed
        t0 = time.perf_counter()
        held_out = None
        if tokens is None:
            tokens, self.data_name, notice = load_training_data(
                model_config, train_config.data_path)
            if notice:
                log(notice)
            else:  # a token file: `anecy prepare --val-frac` may have written its held-out file
                held_out = open_held_out(self.data_name, model_config.vocab_size,
                                         model_config.seq_len)
                if held_out is not None:
                    log(f"held-out data: {held_out.filename}")
        else:
            self.data_name, tokens = "given tokens", np.asarray(tokens)
            if tokens.dtype.kind not in "iu":
                raise DataError(f"given tokens must be integer ids, got {tokens.dtype}")
            if tokens.size and (tokens.min() < 0 or tokens.max() >= model_config.vocab_size):
                raise DataError("given tokens hold ids outside the vocabulary")
        self.tokens = tokens
        self.sampler = TokenSampler(tokens, model_config.seq_len, train_config.seed,
                                    val_tokens=held_out)
        extra = () if held_out is None else (held_out,)
        self.vocab = (VocabMap.from_tokens(tokens, model_config.vocab_size, *extra)
                      if train_config.compact_vocab else VocabMap.full(model_config.vocab_size))
        self.model = Model(model_config, self.backend, seed=train_config.seed)
        if train_config.init_from and _resume_state is None:
            from .pretrained import load_into  # an HF directory or a llama2.c file
            load_into(self.model, train_config.init_from)
            log(f"initial weights: {train_config.init_from}")
        if not self.vocab.is_identity:
            self.model.set_active_vocab(self.vocab.active_ids)
        n = self.model.params.size
        self.adam_m = np.zeros(n, np.float32)
        self.adam_v = np.zeros(n, np.float32)
        self.step_count = 0          # microsteps done
        self.updates = 0             # optimizer updates done
        self.pending = 0             # microsteps accumulated since the last update
        self.totals = {}             # cumulative ms per component
        self.train_ms = 0.0
        self.last_val_loss = None
        # Checkpoint safety: `_checked` says the weights have given a finite loss (and
        # finite gradients) since they last changed; `_diverged` that the state in memory
        # is non-finite and must never be saved; `last_good` the (path, step) of the last
        # checkpoint known to hold good state; `_staged` a written checkpoint that is held
        # back until the next microstep has shown its state to be good.
        self._checked = True
        self._diverged = False
        self.last_good = None
        self._staged = None
        if _resume_state is not None:
            self._restore(*_resume_state)
            self.last_good = (Path(_resume_state[0]), self.step_count)
        self.setup_ms = (time.perf_counter() - t0) * 1e3
        self._stop_requested = False
        self._saving = False
        self._late_stop = False

    # -- schedule and optimizer ------------------------------------------------------------
    def _diverged_error(self, what: str) -> TrainingDiverged:
        """The error for a run gone non-finite; it names the checkpoint that holds the
        last good state (the state in memory is never saved again)."""
        self._diverged = True
        self._discard_staged()
        if self.last_good:
            path, step = self.last_good
            where = (f"the last good state is checkpoint {path} (step {step}); resume it with "
                     "a lower --lr")
        elif self.tc.ckpt_path:
            where = f"no checkpoint was written ({self.tc.ckpt_path} is untouched)"
        else:
            where = "no checkpoint was written"
        return TrainingDiverged(f"{what}; {where}")

    def _update(self):
        """AdamW on the mean gradient of the pending microsteps; returns the grad norm, or
        None when a dynamic loss scale skipped the update (fp16 gradients overflowed)."""
        model, tc = self.model, self.tc
        scale = 1.0 / (self.pending * self.loss_scale)
        engine = model.engine
        norm = math.sqrt(engine.grad_sumsq(model.grads)) * scale
        if not math.isfinite(norm):
            if self.dynamic_scale:
                return self._skip_update()
            raise self._diverged_error(f"gradient norm is {norm} at step {self.step_count}")
        if tc.clip and norm > tc.clip:
            scale *= tc.clip / norm
        self.updates += 1
        lr = tc.lr_at(self.step_count)
        b1, b2 = tc.betas
        # matrices and embeddings (before n_decay) decay, norm weights do not; the same pass
        # checks every parameter and moment for NaN/inf
        nonfinite = engine.adamw(model.params, model.grads, self.adam_m, self.adam_v,
                                 model.n_decay, lr, b1, b2, tc.eps, tc.weight_decay,
                                 self.updates, scale)
        if nonfinite:
            raise self._diverged_error(f"the update at step {self.step_count} made parameters "
                                       f"non-finite (lr {lr:.3g})")
        model.weights_changed()
        self._checked = False
        self.pending = 0
        if self.dynamic_scale:
            self.clean_updates += 1
            if self.clean_updates == tc.loss_scale_growth:
                self.loss_scale *= 2.0
                self.clean_updates = 0
        return norm

    def _skip_update(self):
        """GradScaler's step on overflow: no update, gradients dropped, the scale halved."""
        self.model.zero_grad()
        self.pending = 0
        self.skipped += 1
        self.clean_updates = 0
        self.loss_scale *= 0.5
        if self.loss_scale < 1.0:
            # fp16 gradients that overflow even unscaled are diverging, not overflowing
            raise self._diverged_error(f"gradients are non-finite even at loss scale 1 "
                                       f"(step {self.step_count})")

    # -- one microstep -----------------------------------------------------------------------
    def step(self) -> StepRecord:
        """One microstep, plus the optimizer update when it completes an accumulation."""
        tc, model = self.tc, self.model
        if self._diverged:
            raise TrainingDiverged("the training state is non-finite; resume a checkpoint")
        t0 = time.perf_counter()
        before = model.timings()
        x, y = self.sampler.next_train()
        scale_used = self.loss_scale
        loss = model.forward_backward(x, self.vocab.compact(y), scale_used)
        if not math.isfinite(loss):
            raise self._diverged_error(f"loss is {loss} at step {self.step_count + 1}")
        self.step_count += 1
        self.pending += 1
        if not self._checked:
            self._checked = True
            if self._staged is not None:  # this microstep vouches for the staged state
                if not self.dynamic_scale and not self._grads_finite():
                    raise self._diverged_error(f"gradients are non-finite at step "
                                               f"{self.step_count}")
                self._commit_staged()
        lr = tc.lr_at(self.step_count)
        grad_norm = None
        t_opt = time.perf_counter()
        updated = self.pending == tc.accum or self.step_count == tc.steps
        skipped = False
        if updated:
            grad_norm = self._update()
            skipped = grad_norm is None
            updated = not skipped
        opt_ms = (time.perf_counter() - t_opt) * 1e3
        ms = (time.perf_counter() - t0) * 1e3
        after = model.timings()
        timings = {k: after[k] - before[k] for k in after}
        timings["optimizer"] = opt_ms
        for k, v in timings.items():
            self.totals[k] = self.totals.get(k, 0.0) + v
        self.train_ms += ms
        val = None
        if tc.eval_every and self.step_count % tc.eval_every == 0:
            val = self.last_val_loss = self.evaluate()
        return StepRecord(step=self.step_count, loss=loss, lr=lr, ms=ms,
                          tokens_per_s=self.mc.seq_len / (ms / 1e3), updated=updated,
                          grad_norm=grad_norm, val_loss=val, timings=timings,
                          skipped=skipped, loss_scale=scale_used)

    def evaluate(self) -> float:
        """Mean loss over the held-out windows (over the active vocabulary)."""
        losses = []
        for x, y in self.sampler.val_batches(self.tc.eval_batches):
            logits = self.model.logits(x).astype(np.float64)
            target = self.vocab.compact(y)
            mx = logits.max(axis=1, keepdims=True)
            lse = np.log(np.exp(logits - mx).sum(axis=1)) + mx[:, 0]
            losses.append(float(np.mean(lse - logits[np.arange(len(target)), target])))
        return float(np.mean(losses))

    def sample(self, n_tokens: int = 48) -> str:
        """A greedy sample from BOS, decoded (run() calls it outside the timed step)."""
        if not hasattr(self, "_sampler"):
            from .generate import TrainingSampler
            self._sampler = TrainingSampler(self.tc.tokenizer, self.data_name, self.log)
        return self._sampler(self.model, n_tokens)

    # -- checkpoints -------------------------------------------------------------------------
    # A checkpoint never replaces the previous one before the state it holds has given a
    # finite loss (and, unless a dynamic loss scale would skip the update, finite
    # gradients) on the microstep that follows it -- the very microstep a resume runs
    # first. Divergence often shows one step late: weights finite but absurd, then a NaN.
    def _meta_and_arrays(self):
        meta = {
            "kind": CHECKPOINT_KIND,
            "model_config": self.mc.to_dict(),
            "train_config": self.tc.to_dict(),
            "step": self.step_count, "updates": self.updates, "pending": self.pending,
            "loss_scale": self.loss_scale, "clean_updates": self.clean_updates,
            "dynamic_scale": self.dynamic_scale, "skipped": self.skipped,
            "sampler": self.sampler.state_dict(),
            "n_tokens": int(len(self.tokens)), "data": self.data_name,
            "timings_ms": self.totals, "train_ms": self.train_ms,
        }
        arrays = {"params": self.model.params, "adam_m": self.adam_m, "adam_v": self.adam_v,
                  "active_ids": self.vocab.active_ids.astype(np.int32)}
        if self.pending:  # a checkpoint in the middle of an accumulation keeps its gradients
            arrays["grads"] = self.model.grads
        return meta, arrays

    def _grads_finite(self) -> bool:
        return math.isfinite(self.model.engine.grad_sumsq(self.model.grads))

    def _check_next_microstep(self):
        """Run the next microstep's forward and backward and undo them (data position and
        gradients restored): the state is good if they are finite."""
        if self.pending:
            raise AssertionError("only the state after an update needs this check")
        sampler_state = self.sampler.state_dict()
        x, y = self.sampler.next_train()
        try:
            loss = self.model.forward_backward(x, self.vocab.compact(y), self.loss_scale)
            grads_ok = self.dynamic_scale or self._grads_finite()
        finally:
            self.model.zero_grad()
            self.sampler.load_state_dict(sampler_state)
        if not math.isfinite(loss):
            raise self._diverged_error(f"loss is {loss} at step {self.step_count + 1} "
                                       "(checked before saving)")
        if not grads_ok:
            raise self._diverged_error(f"gradients are non-finite at step "
                                       f"{self.step_count + 1} (checked before saving)")
        self._checked = True

    def _refuse_bad_state(self):
        if self._diverged:
            raise TrainingDiverged("the training state is non-finite; it is never saved")
        if self.pending and not self.dynamic_scale and not self._grads_finite():
            raise self._diverged_error(f"gradients are non-finite at step {self.step_count}")

    def save(self, path=None):
        """Write a checkpoint (atomically) and return its path. The state is checked first:
        a state that has not yet given a finite loss runs the next microstep's forward and
        backward (then undone) and, if they are not finite, TrainingDiverged is raised and
        nothing is written."""
        path = Path(path or self.tc.ckpt_path)
        self._refuse_bad_state()
        self._discard_staged()
        if not self._checked:
            self._check_next_microstep()
        save_checkpoint(path, *self._meta_and_arrays())
        self.last_good = (path, self.step_count)
        return path

    def _save_when_checked(self):
        """The periodic save: written now, put in place once checked. A state that has not
        given a finite loss yet is staged (complete in the temporary beside the checkpoint)
        and committed by the next microstep, which checks it at no extra cost."""
        self._refuse_bad_state()
        if self._checked:
            self.save()
            return
        self._discard_staged()
        path = Path(self.tc.ckpt_path)
        self._staged = (stage_checkpoint(path, *self._meta_and_arrays()), self.step_count)

    def _commit_staged(self):
        staged, step = self._staged
        self._staged = None
        try:
            staged.commit()
        except OSError as e:
            raise CheckpointError(f"checkpoint {staged.path}: cannot write: "
                                  f"{e.strerror or e}") from None
        self.last_good = (staged.path, step)

    def _discard_staged(self):
        if self._staged is not None:
            self._staged[0].discard()
            self._staged = None

    @classmethod
    def resume(cls, path, train_config: Optional[TrainConfig] = None, *,
               model_config: Optional[ModelConfig] = None, tokens=None, log=print):
        """A Trainer continuing from a checkpoint. `train_config` (default: the checkpoint's)
        may change the run's length, output paths and logging; `model_config`, when given,
        must equal the checkpoint's."""
        head = read_checkpoint_meta(path)
        meta = head["meta"]
        if meta.get("kind") != CHECKPOINT_KIND:
            raise CheckpointError(f"checkpoint {path}: not a training checkpoint")
        saved_mc = ModelConfig.from_dict(meta["model_config"])
        if model_config is not None and model_config != saved_mc:
            diff = [f.name for f in fields(ModelConfig)
                    if getattr(model_config, f.name) != getattr(saved_mc, f.name)]
            raise CheckpointError(f"checkpoint {path} holds another model "
                                  f"(differs in {', '.join(diff)})")
        tc = train_config or TrainConfig.from_dict(meta["train_config"])
        return cls(saved_mc, tc, tokens=tokens, log=log, _resume_state=(path, meta))

    def _restore(self, path, meta):
        shapes = {"params": self.model.params, "adam_m": self.adam_m, "adam_v": self.adam_v}
        if meta.get("pending"):
            shapes["grads"] = self.model.grads
        _, arrays = load_checkpoint(path, into=shapes)
        active = arrays["active_ids"]
        if not np.array_equal(active, self.vocab.active_ids.astype(np.int32)):
            raise CheckpointError(f"checkpoint {path} was trained on other data (its active "
                                  f"vocabulary has {len(active)} tokens, this data "
                                  f"{self.vocab.n_active}); pass the same --data")
        if meta["n_tokens"] != len(self.tokens):
            raise CheckpointError(f"checkpoint {path} was trained on {meta['n_tokens']} tokens "
                                  f"of {meta['data']}, this data has {len(self.tokens)}")
        for name in ("params", "adam_m", "adam_v"):
            if not math.isfinite(self.model.engine.grad_sumsq(arrays[name])):
                raise CheckpointError(f"checkpoint {path}: {name} holds NaN or infinite "
                                      "values (saved from a diverged run)")
        self.sampler.load_state_dict(meta["sampler"])
        self.step_count, self.updates, self.pending = meta["step"], meta["updates"], meta["pending"]
        # a dynamic scale continues from where the saved run's left it; a run that used a
        # static scale (or the cpu backend's 1) starts its dynamic scale afresh
        saved_dynamic = meta.get("dynamic_scale")
        if saved_dynamic is None:    # written before the flag: dynamic unless a scale was set
            saved_dynamic = meta.get("train_config", {}).get("loss_scale") is None
        if self.dynamic_scale and not saved_dynamic:
            self.log(f"loss scale: dynamic from {self.loss_scale:g} (the checkpoint's run "
                     "used a static scale)")
        elif self.dynamic_scale and "loss_scale" in meta:
            scale, clean = meta["loss_scale"], meta["clean_updates"]
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
                    or not (1.0 <= scale < math.inf) or not isinstance(clean, int) or clean < 0:
                raise CheckpointError(f"checkpoint {path}: bad loss scale state "
                                      f"({scale!r}, {clean!r})")
            self.loss_scale, self.clean_updates = float(scale), clean
        self.skipped = int(meta.get("skipped", 0))
        self.totals = dict(meta["timings_ms"])
        self.train_ms = meta["train_ms"]
        self.model.weights_changed()

    # -- the whole run -----------------------------------------------------------------------
    def request_stop(self, *_):
        """Finish the current microstep, save, and return from run() (Ctrl-C, SIGTERM).
        A second request stops at once, except during the final save, which is finished
        first (it holds the run's last good state)."""
        if self._saving:
            self._late_stop = True
            return
        if self._stop_requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self._stop_requested = True

    def _open_metrics(self):
        try:
            return open(self.tc.metrics_path, "a")
        except OSError as e:
            raise OutputError(f"cannot write the metrics file {self.tc.metrics_path}: "
                              f"{e.strerror or e}") from None

    def run(self, progress: bool = True) -> dict:
        """Train until `steps` microsteps are done or a stop is requested; returns a summary."""
        from tqdm import tqdm

        tc, mc = self.tc, self.mc
        prepare_outputs(tc, self.log)
        self.log(self.vocab.describe())
        if self.dynamic_scale:
            scale = f" (dynamic loss scale, now {self.loss_scale:g})"
        else:
            scale = f" (loss scale {self.loss_scale:g})" if self.loss_scale != 1.0 else ""
        self.log(f"model: {mc.n_params / 1e6:.1f}M params, {mc.n_layers} layers, dim {mc.dim}, "
                 f"seq {mc.seq_len}; backend {self.backend}{scale}; data: {self.data_name}")
        if self.step_count:
            self.log(f"resumed at step {self.step_count} ({self.updates} updates)")
        old_handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old_handlers[sig] = signal.signal(sig, self.request_stop)
            except ValueError:  # not the main thread: no signal handling
                pass
        try:
            summary = self._run(progress, tqdm)
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
        return summary

    def _run(self, progress, tqdm):
        tc = self.tc
        metrics = self._open_metrics() if tc.metrics_path else None
        metrics_error = None
        first_step, run_start = self.step_count, time.perf_counter()
        bar = tqdm(total=tc.steps, initial=self.step_count, disable=not progress,
                   unit="step", dynamic_ncols=True)
        window = []
        try:
            while self.step_count < tc.steps and not self._stop_requested:
                rec = self.step()
                window.append(rec)
                bar.update(1)
                bar.set_postfix(loss=f"{rec.loss:.4f}", lr=f"{rec.lr:.2e}", ms=f"{rec.ms:.0f}",
                                tok_s=f"{rec.tokens_per_s:.0f}")
                if metrics:
                    try:
                        metrics.write(rec.to_json() + "\n")
                        metrics.flush()
                    except OSError as e:  # disk full, /dev/full: stop, but keep the model
                        metrics_error = e.strerror or str(e)
                        self._stop_requested = True
                if rec.skipped:
                    bar.write(f"step {rec.step}: gradients overflowed at loss scale "
                              f"{rec.loss_scale:g}; update skipped, scale now "
                              f"{self.loss_scale:g}")
                if rec.step % 10 == 0 or rec.step == tc.steps:
                    bar.write(self._progress_line(window))
                    window = []
                if rec.val_loss is not None:
                    bar.write(f"step {rec.step}: val loss {rec.val_loss:.4f}")
                if tc.sample_every and rec.step % tc.sample_every == 0:
                    bar.write(f"step {rec.step} sample: {self.sample()}")
                if tc.ckpt_path and tc.ckpt_every and rec.step % tc.ckpt_every == 0 \
                        and rec.step < tc.steps:
                    self._save_when_checked()
            self._saving = True  # from here on a stop request waits for the final save
        except BaseException:
            self._discard_staged()
            raise
        finally:
            bar.close()
            if metrics:
                try:
                    metrics.close()
                except OSError:
                    pass
        # nothing new to keep when a resumed run had no steps left to do; the final save
        # is finished even if another Ctrl-C or SIGTERM comes while it runs
        saved = None
        try:
            if tc.ckpt_path and self.step_count > first_step:
                saved = self.save()
        finally:
            self._saving = False
        interrupted = self.step_count < tc.steps
        if interrupted:
            where = f"; checkpoint {saved} (continue with --resume)" if saved else ""
            self.log(f"stopped at step {self.step_count}{where}")
        elif saved:
            self.log(f"checkpoint: {saved}")
        if self._late_stop:
            self.log("(a stop request during the final save waited for it to finish)")
        if metrics_error:
            raise OutputError(f"cannot write the metrics file {tc.metrics_path}: "
                              f"{metrics_error}; stopped at step {self.step_count}"
                              + (f", checkpoint {saved}" if saved else ""))
        wall_ms = (time.perf_counter() - run_start) * 1e3
        summary = self.report(self.step_count - first_step, wall_ms)
        summary["interrupted"] = interrupted
        return summary

    def _progress_line(self, recs):
        n = len(recs)
        avg = {k: sum(r.timings.get(k, 0.0) for r in recs) / n for k in recs[-1].timings}
        ms = sum(r.ms for r in recs) / n
        parts = " ".join(f"{k}={avg[k]:.1f}" for k in REPORT_ORDER if k in avg)
        return f"step {recs[-1].step} loss {recs[-1].loss:.4f} | {parts} | {ms:.1f} ms/step"

    def report(self, steps_this_run: int, wall_ms: float) -> dict:
        """Print the Efficiency Report and return its figures."""
        mc = self.mc
        done = max(1, self.step_count)
        ms_per_step = self.train_ms / done
        flops = step_flops(mc, active_vocab=self.vocab.n_active)
        gflops = flops / (ms_per_step * 1e6) if ms_per_step > 0 else 0.0
        lines = ["=== Efficiency Report ===",
                 f"steps:           {self.step_count} ({steps_this_run} this run, "
                 f"{self.updates} optimizer updates, {self.skipped} skipped)",
                 f"wall time:       {wall_ms / 1e3:.1f} s",
                 f"setup time:      {self.setup_ms:.0f} ms (data, model, backend)",
                 f"train time:      {self.train_ms / 1e3:.1f} s",
                 f"avg train:       {ms_per_step:.1f} ms/step",
                 f"FLOPs/step:      {flops / 1e9:.2f} GFLOP (active vocab {self.vocab.n_active})",
                 f"sustained:       {gflops:.1f} GFLOP/s",
                 "per step:        " + " ".join(f"{k}={self.totals.get(k, 0.0) / done:.1f}"
                                                for k in REPORT_ORDER) + " ms"]
        for line in lines:
            self.log(line)
        if self.dynamic_scale or self.skipped:
            self.log(f"loss scale:      dynamic, now {self.loss_scale:g} ({self.skipped} "
                     f"updates skipped: fp16 gradients overflowed)")
        return {"steps": self.step_count, "updates": self.updates, "skipped": self.skipped,
                "ms_per_step": ms_per_step, "gflops": gflops,
                "flops_per_step": flops,
                "breakdown_ms": {k: v / done for k, v in self.totals.items()}}

