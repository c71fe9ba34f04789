"""The training loop: microsteps, gradient accumulation, the LR schedule, evaluation.

Counting: ``steps`` are microsteps (one sequence each); every ``accum`` microsteps
(and after the last one) the optimizer updates the weights. Warmup and the cosine
decay are measured in microsteps too, so the schedule does not depend on ``accum``.

Each other job has its room: the update and the loss scale in ``optimizer``, the
checkpoints (what they hold, when they are written, what a resume accepts) in ``guard``,
what the run prints and records in ``report``, Ctrl-C and SIGTERM in ``stopping``, the
ranks of a data-parallel run (``mpirun -n N``) in ``distributed``: under it a microstep is one
window on each rank, ``step_count`` counts the windows of all ranks, and rank 0 alone prints
and writes."""

import math
import time
from contextlib import contextmanager, nullcontext
from typing import Optional

import numpy as np

from . import ane_health, backends, distributed, guard, trackers
from ._ane_runtime import AneError
from .config import ModelConfig, TrainConfig
from .data import Examples, ExampleSampler, TokenSampler, VocabMap, load_training_data
from .errors import ConfigError, TrainingDiverged
from .fileio import check_writable, remove_leftovers
from .model import Model
from .optimizer import NonFinite, Optimizer
from .report import MetricsFile, StepRecord, efficiency_report, progress_line, run_header
from .stopping import StopRequests
from .timeline import clock_ms

__all__ = ["Trainer", "TrainConfig", "StepRecord", "TrainingDiverged", "prepare_outputs"]


def prepare_outputs(tc: TrainConfig, log=print) -> None:
    """Before any long work: remove the temporaries that killed saves of this checkpoint
    left behind, and check that the checkpoint and metrics files and the trackers' directory
    can be written, and the trackers are installed (an AnecyError, one line, otherwise)."""
    if tc.ckpt_path:
        for p in remove_leftovers(tc.ckpt_path):
            log(f"removed {p} (left by an interrupted save)")
        check_writable(tc.ckpt_path, what="checkpoint", make_parents=True)
    if tc.metrics_path:
        check_writable(tc.metrics_path, what="metrics file", append=True)
    trackers.prepare(tc)


class Trainer:
    """Trains a Model on a token file.

    >>> t = Trainer(ModelConfig.preset("tiny"), TrainConfig(steps=20))
    >>> t.run()                 # or: rec = t.step() for one microstep

    A LoRA run (``lora``, an anecy.lora.LoraConfig, or ``init_adapter``, a PEFT adapter
    directory; or the resume of a LoRA checkpoint) trains adapters on the frozen weights of
    ``train_config.init_from``, and writes LoRA checkpoints naming that base.
    """

    def __init__(self, model_config: ModelConfig, train_config: TrainConfig, *,
                 tokens=None, log=print, lora=None, init_adapter=None, group="auto",
                 _resume_state=None):
        if not isinstance(model_config, ModelConfig) or not isinstance(train_config, TrainConfig):
            raise ConfigError("Trainer needs a ModelConfig and a TrainConfig")
        model_config.validate()
        train_config.validate()
        mc, tc = self.mc, self.tc = model_config, train_config
        # the ranks of an MPI launch (distributed.Group), None for a single process
        self.dp = distributed.Group.from_environment() if group == "auto" else group
        self.writes = self.dp is None or self.dp.rank == 0   # prints, metrics, checkpoints
        if not self.writes:
            log = _silent
        self.log = log
        self.backend = backends.resolve(tc.backend)
        t0 = time.perf_counter()
        data, self.data_name, held_out = load_training_data(mc, tc.data_path, tokens, log)
        self.examples = data if isinstance(data, Examples) else None
        if self.examples is not None:
            # whole examples in windows: packed on cpu; one a window where the programs
            # compile the causal mask and RoPE tables (see docs/chat.md)
            self.tokens = data.tokens
            self.sampler = ExampleSampler(data, mc.seq_len, tc.seed, val_examples=held_out,
                                          one_per_window=self.backend != "cpu")
            if tc.eval_every and held_out is None:
                raise ConfigError(f"{self.data_name} has no held-out examples for --eval-every "
                                  "(prepare it with --val-frac, or leave out --eval-every)")
            self.useful_tokens = 0        # positions scored or giving context to a scored one
            self._update_windows = (None, [], 0)   # (first index, windows, scored tokens)
            held_out = None if held_out is None else held_out.tokens
        else:
            self.tokens = data
            self.sampler = TokenSampler(self.tokens, mc.seq_len, tc.seed, val_tokens=held_out)
        extra = () if held_out is None else (held_out,)
        self.vocab = (VocabMap.from_tokens(self.tokens, mc.vocab_size, *extra)
                      if tc.compact_vocab else VocabMap.full(mc.vocab_size))
        adapters = self._adapters(mc, tc, lora, init_adapter, _resume_state)
        self.model, self.backend = ane_health.build_model(
            lambda b: Model(mc, b, seed=tc.seed, adapters=adapters), tc.backend, self.backend,
            mc, log)
        self.base = None             # a LoRA run's base: {"path", "hash"} (lora.base_hash)
        if tc.init_from and (_resume_state is None or adapters is not None):
            from .pretrained import load_into  # an HF directory or a llama2.c file
            load_into(self.model, tc.init_from)
            if adapters is not None:
                from .lora import base_hash
                self.base = {"path": str(tc.init_from), "hash": base_hash(self.model)}
                log(f"LoRA adapters (rank {adapters.config.rank}, {adapters.params.size} "
                    f"parameters) on the frozen weights of {tc.init_from}")
            else:
                log(f"initial weights: {tc.init_from}")
        elif adapters is not None:
            raise ConfigError("a LoRA run needs the base weights it adapts (init_from)")
        if not self.vocab.is_identity:
            self.model.set_active_vocab(self.vocab.active_ids)
        self.optimizer = Optimizer(self.model, tc, self.backend)
        self.step_count = 0          # microsteps done
        self.pending = 0             # microsteps accumulated since the last update
        self.totals = {}             # cumulative ms per component
        self.train_ms = 0.0
        self.last_val_loss = None
        self.guard = guard.CheckpointGuard(self)
        if _resume_state is not None:
            guard.restore(self, *_resume_state)
        self.stop = StopRequests()
        self._ckpt_mark = self.step_count      # the step of the last periodic save
        self.stop_agreed = False               # data parallel: a rank asked to stop
        if self.dp is not None:
            self._join(_resume_state)
        self.setup_ms = (time.perf_counter() - t0) * 1e3

    def _join(self, resume_state):
        """Start a data-parallel run: every rank must hold the same code, settings, data,
        weights and data position; a resumed accumulation's gradients stay on rank 0 alone
        (they are summed over the ranks at the update)."""
        import json
        dp, opt = self.dp, self.optimizer
        settings = json.dumps([self.mc.to_dict(), self.tc.to_dict(),
                               None if self.model.adapters is None
                               else self.model.adapters.config.to_dict()], sort_keys=True)
        position = json.dumps([self.sampler.state_dict(), self.step_count, self.pending],
                              sort_keys=True, default=str)
        weights = [self.model.params, opt.m, opt.v]
        if self.model.adapters is not None:
            weights.append(self.model.adapters.params)
        text = distributed.text_checksum
        dp.check_same({"anecy code": distributed.code_fingerprint(),
                       "settings": text(settings),
                       "data": distributed.checksum(np.asarray(self.tokens)) ^ len(self.tokens),
                       "weights": distributed.checksum(*weights),
                       "data position": text(position)})
        dp.stop = self.stop
        dp.joined = True
        dp.last_good = lambda: self.guard.last_good
        if self.pending and dp.rank != 0:
            opt.grads[:] = 0
        if resume_state is not None:
            saved = resume_state[1].get("world_size", 1)
            self.log(f"checkpoint written by {saved} rank{'s' if saved != 1 else ''}; "
                     f"continuing on {dp.size}")

    @staticmethod
    def _adapters(mc, tc, lora, init_adapter, resume_state):
        """The LoraAdapters of a LoRA run (None for full training): a resumed checkpoint's
        (filled in by guard.restore), a PEFT directory's, or new ones as PEFT starts them."""
        from .lora import LORA_CHECKPOINT, LoraAdapters, LoraConfig, read_peft
        if resume_state is not None:
            meta = resume_state[1]
            if meta.get("kind") != LORA_CHECKPOINT:
                return None
            lora = LoraConfig.from_dict(meta["lora_config"])
        elif init_adapter is not None:
            adapters = read_peft(init_adapter, mc)
            if lora is not None:
                adapters.config.dropout = lora.dropout
            lora = adapters.config
        if lora is None:
            return None
        if lora.dropout and backends.resolve(tc.backend) != "cpu":
            raise ConfigError(f"LoRA dropout {lora.dropout:g} needs the cpu backend: the sim "
                              "and ane kernels run the merged weight W0 + s B A, which cannot "
                              "drop the adapters' input alone (train with --lora-dropout 0)")
        return adapters if init_adapter is not None and resume_state is None \
            else LoraAdapters(mc, lora, seed=tc.seed)

    # -- one microstep -----------------------------------------------------------------------
    def step(self) -> StepRecord:
        """One microstep, plus the optimizer update when it completes an accumulation."""
        tc, model = self.tc, self.model
        self.guard.refuse_broken("resume a checkpoint")
        t0 = time.perf_counter()
        t_start = clock_ms()
        before = model.timings()
        scale_used = self.optimizer.scale.value
        try:
            loss, useful, windows, due = self._any_microstep(scale_used)
        except AneError as e:        # --backend auto: on cpu from here; ane: one line, exit 2
            ane_health.fall_back(self, e)
            loss, useful, windows, due = self._any_microstep(scale_used)
        if not math.isfinite(loss):
            raise self.guard.diverged(f"loss is {loss} at step {self.step_count + windows}")
        self.step_count += windows
        self.pending += windows
        self.guard.microstep_done()
        t_opt = clock_ms()     # the timeline's clock: the update's slice is opt_ms
        grad_norm, skipped, updating = None, False, False
        if due:
            updating = True
            if self.dp is not None:
                with model.recording.span("allreduce") if model.recording is not None \
                        else nullcontext():
                    self.dp.sum_gradients(self.optimizer.grads, "the gradient all-reduce of "
                                          f"update {self.optimizer.updates + 1}")
            grad_norm = self._update()
            skipped = grad_norm is None
        t_end = clock_ms()
        opt_ms = t_end - t_opt
        ms = (time.perf_counter() - t0) * 1e3
        if model.recording is not None:
            model.recording.microstep(t_start, t_opt, t_end, loss, scale_used, updating)
        after = model.timings()
        timings = {k: after[k] - before[k] for k in after}
        timings["optimizer"] = opt_ms
        for k, v in timings.items():
            self.totals[k] = self.totals.get(k, 0.0) + v
        self.train_ms += ms
        val = None
        if tc.eval_every and _reached(tc.eval_every, self.step_count - windows,
                                      self.step_count):
            try:
                val = self.evaluate()
            except AneError as e:
                ane_health.fall_back(self, e)
                val = self.evaluate()
            self.last_val_loss = val
        rec = StepRecord(step=self.step_count, loss=loss, lr=tc.lr_at(self.step_count), ms=ms,
                         tokens_per_s=windows * self.mc.seq_len / (ms / 1e3),
                         updated=grad_norm is not None, grad_norm=grad_norm, val_loss=val,
                         timings=timings, skipped=skipped, loss_scale=scale_used)
        if useful is not None:
            self.useful_tokens += useful
            rec.useful_tokens_per_s = useful / (ms / 1e3)
            rec.useful_fraction = useful / (windows * self.mc.seq_len)
        return rec

    def _any_microstep(self, scale):
        """This process's microstep, or over MPI every rank's: (loss, useful tokens, windows
        done, whether an update is due)."""
        if self.dp is not None:
            return self._dp_microstep(scale)
        loss, useful = self.next_microstep(scale)
        due = self.pending + 1 == self.tc.accum or self.step_count + 1 == self.tc.steps
        return loss, useful, 1, due

    def _dp_microstep(self, scale):
        """A data-parallel microstep: this rank's window of the next ones (rank r takes
        window ``step_count + r``; a rank past the update's last window computes nothing),
        then the ranks' losses, useful positions and stop requests summed. Returns (mean loss,
        useful positions, windows done by all ranks, whether the update is due)."""
        dp = self.dp
        start = self.step_count - self.pending
        end = start + max(1, min(self.tc.accum * dp.size, self.tc.steps - start))
        windows = min(dp.size, end - self.step_count)
        mine = dp.rank < windows
        loss, useful = self.next_microstep(scale, dp.rank, windows) if mine \
            else self._skip_windows(windows)
        stats = dp.sum_stats([loss if mine else 0.0, useful or 0.0,
                              float(self.stop.requested)],
                             f"the exchange ending step {self.step_count + windows}")
        if stats[2]:
            self.stop_agreed = True                # every rank stops after this microstep
        return (float(stats[0]) / windows, None if useful is None else float(stats[1]),
                windows, self.step_count + windows == end)

    def _skip_windows(self, n):
        """Draw and drop the next ``n`` windows (other ranks compute them)."""
        if self.examples is None:
            self.sampler.skip(n)
            return 0.0, None
        self.sampler.drawn += n
        return 0.0, 0.0

    def next_microstep(self, scale, offset=0, count=1) -> tuple:
        """The next microstep's forward and backward (gradients times `scale` added): its
        loss, and on examples its useful positions (else None). On examples the loss is the
        mean over the microstep's scored tokens, while the gradient is that of the mean over
        the scored tokens of the whole update (HF's normalisation: a microstep with more
        scored tokens weighs more), so the update's windows are counted first. A rank of a
        data-parallel run takes window `offset` of the next `count` (the others are drawn
        and dropped)."""
        adapters = self.model.adapters
        if adapters is not None and adapters.config.dropout:
            # this window's masks, drawn from the run's seed and the window's number (a
            # resumed run, or a run on another number of ranks, draws the same ones)
            self.model.set_lora_dropout(adapters.config.dropout,
                                        (self.tc.seed << 32) + self.step_count + offset)
        if self.examples is None:
            self.sampler.skip(offset)
            x, y = self.sampler.next_train()
            self.sampler.skip(count - offset - 1)
            return self.model.forward_backward(x, self.vocab.compact(y), scale), None
        win, n_update = self._next_window(offset)
        self.sampler.drawn += count
        total = self.model.forward_backward(win.x, self._targets(win), scale,
                                            weights=win.weights / np.float32(n_update),
                                            **self._packing(win))
        return total * n_update / win.scored, win.useful

    def _next_window(self, offset=0):
        """Window `offset` of the next ones, and the scored tokens of its update's windows
        (of every rank's)."""
        start = self.sampler.drawn - self.pending       # the update's first window
        first, windows, n_update = self._update_windows
        if first != start:
            remaining = self.tc.steps - (self.step_count - self.pending)
            ranks = 1 if self.dp is None else self.dp.size
            n = max(1, min(self.tc.accum * ranks, remaining))
            windows = [self.sampler.window(start + j) for j in range(n)]
            n_update = sum(w.scored for w in windows)
            self._update_windows = (start, windows, n_update)
        return windows[self.sampler.drawn + offset - start], n_update

    def _update(self):
        """The optimizer's update on the pending microsteps: the gradient norm, or None when
        a dynamic loss scale skipped it."""
        try:
            norm = self.optimizer.update(self.pending, self.step_count)
        except NonFinite as e:
            raise self.guard.diverged(str(e)) from None
        self.pending = 0
        if norm is not None:
            self.guard.weights_changed()
        return norm

    def evaluate(self) -> float:
        """Mean loss over the held-out windows (over the active vocabulary); on examples,
        the mean over every held-out scored token."""
        if self.examples is None:
            return float(np.mean([self.model.loss(x, self.vocab.compact(y))
                                  for x, y in self.sampler.val_batches(self.tc.eval_batches)]))
        windows = self.sampler.val_windows()
        total = sum(self.model.loss(w.x, self._targets(w), weights=w.weights,
                                    **self._packing(w)) for w in windows)
        return total / sum(w.scored for w in windows)

    def _targets(self, win):
        """A window's targets as classifier rows; those of unscored positions (padding
        among them) are never read and stay 0."""
        y = np.zeros_like(win.y)
        scored = win.weights != 0
        y[scored] = self.vocab.compact(win.y[scored])
        return y

    def _packing(self, win) -> dict:
        """The position ids and segment starts of a packed window (cpu); the sim and ane
        windows hold one example each, at positions 0.. of the compiled programs."""
        if self.backend != "cpu":
            return {}
        return dict(positions=win.positions, segment_starts=win.segment_starts)

    @contextmanager
    def trace(self, path, *, microsteps: int = 16, rank=None):
        """Model.trace, with each microstep, the optimizer update and the loss and loss
        scale (counters) recorded too: ``with trainer.trace("run.json"): trainer.step()``."""
        with self.model.trace(path, microsteps=microsteps, rank=rank) as rec:
            yield rec

    def sample(self, n_tokens: int = 48) -> str:
        """A greedy sample from BOS, decoded (run() calls it outside the timed step)."""
        if not hasattr(self, "_sampler"):
            from .generate import TrainingSampler
            self._sampler = TrainingSampler(self.tc.tokenizer, self.data_name, self.log)
        return self._sampler(self.model, n_tokens)

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, path=None):
        """Write a checkpoint (atomically) and return its path. The state is checked first:
        a state that has not yet given a finite loss runs the next microstep's forward and
        backward (then undone) and, if they are not finite, TrainingDiverged is raised and
        nothing is written."""
        return self.guard.save(path or self.tc.ckpt_path)

    @classmethod
    def resume(cls, path, train_config: Optional[TrainConfig] = None, *,
               model_config: Optional[ModelConfig] = None, tokens=None, log=print,
               group="auto"):
        """A Trainer continuing from a checkpoint. `train_config` (default: the checkpoint's)
        may change the run's length, output paths and logging; `model_config`, when given,
        must equal the checkpoint's. A checkpoint resumes on any number of ranks."""
        saved_mc, meta = guard.read_resume_meta(path, model_config)
        tc = train_config or TrainConfig.from_dict(meta["train_config"])
        return cls(saved_mc, tc, tokens=tokens, log=log, group=group,
                   _resume_state=(path, meta))

    # -- the whole run -----------------------------------------------------------------------
    def request_stop(self, *_):
        """Finish the current microstep, save, and return from run() (Ctrl-C, SIGTERM).
        A second request stops at once, except during the final save."""
        self.stop()

    def run(self, progress: bool = True, trace=None) -> dict:
        """Train until `steps` microsteps are done or a stop is requested; returns a summary.
        `trace`: an anecy.timeline.TraceWindow, the microsteps to record (--trace)."""
        if self.writes:
            prepare_outputs(self.tc, self.log)
        self.log(self.vocab.describe())
        self.log(run_header(self))
        if self.dp is not None:
            self.log(f"{self.dp.describe()}; {self.tc.accum} microsteps per rank per update "
                     f"({self.tc.accum * self.dp.size} windows)")
        if self.step_count:
            self.log(f"resumed at step {self.step_count} ({self.optimizer.updates} updates)")
        with self.stop.on_signals():
            return self._run(progress, trace)

    def _run(self, progress, trace=None):
        from tqdm import tqdm
        tc, first_step, run_start = self.tc, self.step_count, time.perf_counter()
        metrics = MetricsFile(tc.metrics_path) if tc.metrics_path and self.writes else None
        reported = trackers.Trackers.for_run(tc) if self.writes else trackers.Trackers()
        reported.start({"model": self.mc.to_dict(), "train": tc.to_dict()})
        bar = tqdm(total=tc.steps, initial=self.step_count,
                   disable=not progress or not self.writes, unit="step", dynamic_ncols=True)
        window = []
        run_steps = 0
        try:
            while self.step_count < tc.steps and not self._stopping():
                before = self.step_count
                run_steps += 1
                if trace is not None:
                    trace.before(self, run_steps)
                rec = self.step()
                if trace is not None:
                    trace.after(self, run_steps)
                window.append(rec)
                bar.update(rec.step - before)
                bar.set_postfix(loss=f"{rec.loss:.4f}", lr=f"{rec.lr:.2e}", ms=f"{rec.ms:.0f}",
                                tok_s=f"{rec.tokens_per_s:.0f}")
                reported.log(rec)
                if metrics and not metrics.write(rec):
                    self.stop.requested = True  # disk full, /dev/full: stop, but keep the model
                if rec.skipped:
                    bar.write(f"step {rec.step}: gradients overflowed at loss scale "
                              f"{rec.loss_scale:g}; update skipped, scale now "
                              f"{self.optimizer.scale.value:g}")
                if _reached(10, before, rec.step) or rec.step == tc.steps:
                    if self.writes:
                        bar.write(progress_line(window))
                    window = []
                if rec.val_loss is not None and self.writes:
                    bar.write(f"step {rec.step}: val loss {rec.val_loss:.4f}")
                if tc.sample_every and _reached(tc.sample_every, before, rec.step) \
                        and self.writes:
                    bar.write(f"step {rec.step} sample: {self.sample()}")
                if tc.ckpt_path and tc.ckpt_every and rec.step < tc.steps \
                        and self._periodic_save_due(rec.step):
                    self._ckpt_mark = rec.step
                    if self.writes:
                        if self.dp is not None:
                            self.dp.saving()
                        self.guard.save_when_checked()
            self.stop.saving = True  # from here on a stop request waits for the final save
        except BaseException:
            self.guard.discard()
            reported.finish()
            raise
        finally:
            bar.close()
            if trace is not None:
                trace.close()  # a run shorter than the window: what was recorded
            reported.close()   # the trackers finish in their thread while the run saves
            if metrics:
                metrics.close()
        # nothing new to keep when a resumed run had no steps left to do
        saved = None
        try:
            if tc.ckpt_path and self.step_count > first_step:
                if self.dp is not None and self.pending:
                    # stopped inside an accumulation: rank 0 keeps the sum of every rank's
                    self.dp.sum_gradients(self.optimizer.grads, "the final gradient sum")
                if self.writes:
                    if self.dp is not None:
                        self.dp.saving()
                    saved = self.save()
        finally:
            self.stop.saving = False
            reported.finish()
        interrupted = self.step_count < tc.steps
        if interrupted:
            where = f"; checkpoint {saved} (continue with --resume)" if saved else ""
            self.log(f"stopped at step {self.step_count}{where}")
        elif saved:
            self.log(f"checkpoint: {saved}")
        if self.stop.during_save:
            self.log("(a stop request during the final save waited for it to finish)")
        if metrics and metrics.error:
            raise metrics.failure(self.step_count, saved)
        summary = self.report(self.step_count - first_step,
                              (time.perf_counter() - run_start) * 1e3)
        summary["interrupted"] = interrupted
        return summary

    def _stopping(self) -> bool:
        """A stop was requested; in a data-parallel run, on some rank as of the last
        microstep's sums, so that every rank stops after the same one."""
        return self.stop.requested if self.dp is None else self.stop_agreed

    def _periodic_save_due(self, step) -> bool:
        """Every `ckpt_every` microsteps; in a data-parallel run at the first update after
        (only there does rank 0 hold the whole state)."""
        if self.dp is None:
            return step % self.tc.ckpt_every == 0
        return self.pending == 0 and _reached(self.tc.ckpt_every, self._ckpt_mark, step)

    def report(self, steps_this_run: int, wall_ms: float) -> dict:
        """Print the Efficiency Report and return its figures."""
        dp = self.dp
        if dp is None:
            return efficiency_report(self, steps_this_run, wall_ms)
        # every rank's train time and gradient all-reduce time, the figures above rank 0's
        every = dp.gather([self.train_ms, dp.reduce_ms], "the Efficiency Report")
        summary = efficiency_report(self, steps_this_run, wall_ms)
        summary["rank_train_ms"] = every[:, 0].tolist()
        if dp.reduces:
            summary["allreduce_ms"] = float(every[:, 1].mean()) / dp.reduces
            summary["allreduce_bytes"] = dp.reduce_bytes // dp.reduces
            self.log(f"data parallel:   {dp.size} ranks, gradient all-reduce "
                     f"{summary['allreduce_ms']:.1f} ms (mean of the ranks) and "
                     f"{summary['allreduce_bytes'] / 1e6:.1f} MB per update; ranks' train "
                     f"time {every[:, 0].min() / 1e3:.1f}-{every[:, 0].max() / 1e3:.1f} s")
        return summary


def _silent(*_):
    """The log of ranks other than 0."""


def _reached(every: int, before: int, after: int) -> bool:
    """Whether a multiple of `every` lies in (before, after]: a data-parallel microstep
    advances the step count by the number of ranks."""
    return after // every > before // every

