"""The optimizer: AdamW on the mean gradient of the microsteps since the last update, the
gradient norm clipped, and the loss scale that keeps fp16 gradients from underflowing.

The AdamW pass itself is Engine.adamw (PyTorch's formula, element by element as _ops.adamw,
clearing the gradients as it reads them and checking every parameter and moment for NaN/inf
on the way). Its state (the two moments, the update count and the loss scale's) goes into
training checkpoints."""

import math

import numpy as np

from . import backends
from .errors import CheckpointError


class NonFinite(ArithmeticError):
    """A gradient, parameter or moment became NaN or infinite; the message says which and at
    which step (the trainer turns it into TrainingDiverged, naming the last good checkpoint)."""


class LossScale:
    """The factor the loss is multiplied by before the backward pass (and the gradients
    divided by before the update). Static, or, unless a static scale is asked for on the fp16
    backends, dynamic as PyTorch's GradScaler: halved when the gradients overflow (the update
    is skipped), doubled after ``growth`` clean updates in a row."""

    def __init__(self, backend: str, static=None, growth: int = 2000):
        self.dynamic = static is None and backends.DYNAMIC_LOSS_SCALE[backend]
        self.value = static if static is not None else backends.DEFAULT_LOSS_SCALE[backend]
        self.growth = growth
        self.clean_updates = 0       # updates since the dynamic scale last changed
        self.skipped = 0             # updates skipped because fp16 gradients overflowed

    def clean_update(self):
        if self.dynamic:
            self.clean_updates += 1
            if self.clean_updates == self.growth:
                self.value *= 2.0
                self.clean_updates = 0

    def overflowed(self, step: int):
        """GradScaler's step on overflow: the update skipped, the scale halved."""
        self.skipped += 1
        self.clean_updates = 0
        self.value *= 0.5
        if self.value < 1.0:
            # fp16 gradients that overflow even unscaled are diverging, not overflowing
            raise NonFinite(f"gradients are non-finite even at loss scale 1 (step {step})")

    def describe(self) -> str:
        """For the run's header line: empty for the cpu backend's unscaled loss."""
        if self.dynamic:
            return f" (dynamic loss scale, now {self.value:g})"
        return f" (loss scale {self.value:g})" if self.value != 1.0 else ""

    def restore(self, meta: dict, path, log):
        """Continue a checkpoint's scale: a dynamic scale goes on from where the saved run's
        left it; a run that used a static scale (or the cpu backend's 1) starts its dynamic
        scale afresh."""
        saved_dynamic = meta.get("dynamic_scale")
        if saved_dynamic is None:    # written before the flag: dynamic unless a scale was set
            saved_dynamic = meta.get("train_config", {}).get("loss_scale") is None
        if self.dynamic and not saved_dynamic:
            log(f"loss scale: dynamic from {self.value:g} (the checkpoint's run used a static "
                "scale)")
        elif self.dynamic and "loss_scale" in meta:
            scale, clean = meta["loss_scale"], meta["clean_updates"]
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
                    or not (1.0 <= scale < math.inf) or not isinstance(clean, int) or clean < 0:
                raise CheckpointError(f"checkpoint {path}: bad loss scale state "
                                      f"({scale!r}, {clean!r})")
            self.value, self.clean_updates = float(scale), clean
        self.skipped = int(meta.get("skipped", 0))


class Optimizer:
    """AdamW with global-norm clipping and a loss scale, over a Model's trainable flat
    buffers (``Model.trainable``): in full training matrices and embeddings (before
    ``model.n_decay``) decay, norm weights do not; in a LoRA model only the adapters learn."""

    def __init__(self, model, tc, backend: str):
        self.model, self.tc = model, tc
        self.params, self.grads, self.n_decay = model.trainable()
        self.scale = LossScale(backend, tc.loss_scale, tc.loss_scale_growth)
        self.m = np.zeros(self.params.size, np.float32)
        self.v = np.zeros(self.params.size, np.float32)
        self.updates = 0             # optimizer updates done

    def grads_finite(self) -> bool:
        return math.isfinite(self.model.engine.grad_sumsq(self.grads))

    def update(self, microsteps: int, step: int):
        """One update on the gradients of ``microsteps`` microsteps, after microstep ``step``;
        returns the unscaled gradient norm, or None when a dynamic loss scale skipped the update
        (fp16 gradients overflowed; they are dropped). NonFinite when the run diverged."""
        model, tc = self.model, self.tc
        scale = 1.0 / (microsteps * self.scale.value)
        engine = model.engine
        norm = math.sqrt(engine.grad_sumsq(self.grads)) * scale
        if not math.isfinite(norm):
            if self.scale.dynamic:
                model.zero_grad()
                self.scale.overflowed(step)
                return None
            raise NonFinite(f"gradient norm is {norm} at step {step}")
        if tc.clip and norm > tc.clip:
            scale *= tc.clip / norm
        self.updates += 1
        lr = tc.lr_at(step)
        b1, b2 = tc.betas
        nonfinite = engine.adamw(self.params, self.grads, self.m, self.v, self.n_decay, lr,
                                 b1, b2, tc.eps, tc.weight_decay, self.updates, scale)
        if nonfinite:
            raise NonFinite(f"the update at step {step} made parameters non-finite "
                            f"(lr {lr:.3g})")
        model.weights_changed()
        self.scale.clean_update()
        return norm
