"""Model: the parameters of a Llama-family transformer and its training step.

Parameters live in one contiguous fp32 buffer with named views (HF names and
shapes); gradients mirror it. Matrices come first and norm weights last, so the
optimizer decays one contiguous range and leaves the other alone."""

from contextlib import contextmanager

import numpy as np

from . import backends
from ._engine import Engine
from .config import ModelConfig
from .errors import ConfigError

_FLT_MAX = float(np.finfo(np.float32).max)  # the engine takes the loss scale as a float

EMBEDDING = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
FINAL_NORM = "model.norm.weight"


def layer_tensors(cfg: ModelConfig):
    """One layer's tensors as (matrices, norm weights), each a list of (field, HF name inside
    ``model.layers.{l}.``, shape) in buffer order; field is the engine's name for it."""
    D, H, Q, K, hd = cfg.dim, cfg.hidden_dim, cfg.q_dim, cfg.kv_dim, cfg.head_dim
    mats = [("wq", "self_attn.q_proj.weight", (Q, D)), ("wk", "self_attn.k_proj.weight", (K, D)),
            ("wv", "self_attn.v_proj.weight", (K, D)), ("wo", "self_attn.o_proj.weight", (D, Q)),
            ("w1", "mlp.gate_proj.weight", (H, D)), ("w3", "mlp.up_proj.weight", (H, D)),
            ("w2", "mlp.down_proj.weight", (D, H))]
    norms = [("attn_norm", "input_layernorm.weight", (D,)),
             ("ffn_norm", "post_attention_layernorm.weight", (D,))]
    if cfg.qk_norm:
        norms += [("q_norm", "self_attn.q_norm.weight", (hd,)),
                  ("k_norm", "self_attn.k_norm.weight", (hd,))]
    return mats, norms


def layer_names(cfg: ModelConfig, l: int) -> dict:
    """{engine field: HF name} of layer l's tensors."""
    mats, norms = layer_tensors(cfg)
    return {field: f"model.layers.{l}.{name}" for field, name, _ in mats + norms}


def classifier_name(cfg: ModelConfig) -> str:
    """The tensor whose rows the classifier uses: the embedding when tied, else lm_head."""
    return EMBEDDING if cfg.tie_embeddings else LM_HEAD


def param_layout(cfg: ModelConfig):
    """[(name, shape, decayed)] in buffer order: every matrix, then every norm weight."""
    mats = [(EMBEDDING, (cfg.vocab_size, cfg.dim))]
    norms = []
    layer_mats, layer_norms = layer_tensors(cfg)
    for l in range(cfg.n_layers):
        mats += [(f"model.layers.{l}.{name}", shape) for _, name, shape in layer_mats]
        norms += [(f"model.layers.{l}.{name}", shape) for _, name, shape in layer_norms]
    if not cfg.tie_embeddings:
        mats.append((LM_HEAD, (cfg.vocab_size, cfg.dim)))
    norms.append((FINAL_NORM, (cfg.dim,)))
    return [(n, s, True) for n, s in mats] + [(n, s, False) for n, s in norms]


def _rope_row_perm(head_dim):
    """Rows of one head in interleaved order, as indices into HF's half-split order."""
    half = head_dim // 2
    perm = np.empty(head_dim, np.int64)
    perm[0::2] = np.arange(half)
    perm[1::2] = np.arange(half) + half
    return perm


def _is_rope_permuted(name):
    return name.endswith(("q_proj.weight", "k_proj.weight", "q_norm.weight", "k_norm.weight"))


def hf_row_order(cfg: ModelConfig, name: str, rows: int):
    """Row index that maps HF's (half) order onto cfg's order for the tensor ``name`` with
    ``rows`` rows (whole heads of q/k rows), or None when the orders agree: ``ours =
    theirs[perm]`` and ``theirs[perm] = ours``. Also used for tensors whose rows are q_proj's
    or k_proj's output channels, such as their LoRA B matrices."""
    if cfg.rope_style == "half" or not _is_rope_permuted(name):
        return None
    hd = cfg.head_dim
    return (np.arange(rows // hd)[:, None] * hd + _rope_row_perm(hd)[None, :]).reshape(-1)


class Model:
    """A Llama-family transformer with exact gradients.

    >>> m = Model(ModelConfig.preset("tiny"))
    >>> loss = m.forward_backward(tokens, targets)   # gradients accumulate in m.grads

    With ``adapters`` (an anecy.lora.LoraAdapters) the model is the base plus the adapters'
    low-rank paths, and only the adapters learn: the base has no gradient buffer (``grads``
    is None) and the adapters' gradients accumulate in ``adapter_grads``.
    """

    def __init__(self, config: ModelConfig, backend: str = "cpu", seed: int = 0,
                 async_dw=None, adapters=None):
        if not isinstance(config, ModelConfig):
            raise ConfigError("config must be an anecy.ModelConfig")
        config.validate()
        self.config = config
        self.backend = backends.resolve(backend)
        self.layout = param_layout(config)
        n = sum(int(np.prod(s)) for _, s, _ in self.layout)
        self.params = np.zeros(n, np.float32)
        self.adapters = adapters
        self.adapter_grads = None
        if adapters is None:
            self.grads = np.zeros(n, np.float32)
            self.grad_views = {}
        else:   # a frozen base: no gradient for it
            from .lora import _check_same_shape
            _check_same_shape(config, adapters.model_config)
            self.grads = self.grad_views = None
            self.adapter_grads = np.zeros_like(adapters.params)
        self.views, self.offsets = {}, {}
        off = 0
        for name, shape, _ in self.layout:
            size = int(np.prod(shape))
            self.offsets[name] = (off, off + size)
            self.views[name] = self.params[off:off + size].reshape(shape)
            if self.grads is not None:
                self.grad_views[name] = self.grads[off:off + size].reshape(shape)
            off += size
        # everything before the first norm weight is decayed by AdamW
        self.n_decay = min(self.offsets[name][0] for name, _, decayed in self.layout
                           if not decayed)
        self.init_weights(seed)
        if async_dw is None:  # the backend's default (see backends.DEFAULT_ASYNC_DW)
            async_dw = backends.DEFAULT_ASYNC_DW[self.backend]
        self.engine = Engine(config, self.views, self.grad_views,
                             backends.make_kernels(self.backend), bool(async_dw),
                             adapters, self.adapter_grads)
        self.active_ids = None   # vocabulary rows the classifier runs over (None: all)
        self.recording = None    # the anecy.timeline.Recording recording its steps, if any
        self.engine.stage_weights()

    def switch_backend(self, backend: str):
        """Run on ``backend`` from now on (the ane backend's fallback to cpu after a failed
        evaluation): a new Engine over the same parameter and gradient buffers, the
        gradients cleared (a failed kernel call leaves them NaN)."""
        self.backend = backends.resolve(backend)
        self.engine = Engine(self.config, self.views, self.grad_views,
                             backends.make_kernels(self.backend),
                             bool(backends.DEFAULT_ASYNC_DW[self.backend]), self.adapters,
                             self.adapter_grads)
        for g in (self.grads, self.adapter_grads):
            if g is not None:
                g[...] = 0.0
        self.set_active_vocab(self.active_ids)
        self.engine.stage_weights()

    # -- initialisation --------------------------------------------------------------------
    def init_weights(self, seed: int = 0):
        """llama2.c's scheme: N(0, 0.02) for every matrix, norms at 1, and the output
        projections of attention and FFN (o_proj, down_proj) at 0.02 / sqrt(2 n_layers)."""
        rng = np.random.Generator(np.random.PCG64(seed))
        out_std = 0.02 / np.sqrt(2 * self.config.n_layers)
        for name, shape, decayed in self.layout:
            view = self.views[name]
            if not decayed:
                view[...] = 1.0
                continue
            std = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            view[...] = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        if hasattr(self, "engine"):
            self.weights_changed()

    @property
    def _classifier_name(self):
        return classifier_name(self.config)

    # -- vocabulary compaction -------------------------------------------------------------
    def set_active_vocab(self, active_ids=None):
        """Run the classifier and softmax over these vocabulary rows only (None: all rows).

        Targets given to forward_backward are then indices into active_ids, and logits()
        has one column per active id. The rows are a copy, refreshed by weights_changed()."""
        name = self._classifier_name
        if active_ids is None:
            self.active_ids = None
            self.engine.set_classifier(self.views[name],
                                       None if self.grads is None else self.grad_views[name])
            return
        ids = np.asarray(active_ids, np.int64)
        if ids.ndim != 1 or ids.size == 0 or np.any(np.diff(ids) <= 0) or ids[0] < 0 \
                or ids[-1] >= self.config.vocab_size:
            raise ConfigError("active_ids must be sorted, unique ids inside the vocabulary")
        self.active_ids = ids
        self._cls_weight = np.ascontiguousarray(self.views[name][ids])
        self._cls_grad = None if self.grads is None else np.zeros_like(self._cls_weight)
        self.engine.set_classifier(self._cls_weight, self._cls_grad)

    def weights_changed(self):
        """Call after writing to params (optimizer update, load): refreshes the copies
        the backends keep (compact classifier rows, staged kernel weights)."""
        if self.active_ids is not None:
            np.take(self.views[self._classifier_name], self.active_ids, axis=0,
                    out=self._cls_weight)
        self.engine.stage_weights()

    # -- the step --------------------------------------------------------------------------
    def forward_backward(self, tokens, targets, loss_scale: float = 1.0, *, weights=None,
                         positions=None, segment_starts=None) -> float:
        """Token cross-entropy of one sequence of seq_len tokens: the mean, or with `weights`
        (one per position, 0 where not scored) the weighted sum; its gradient (times
        loss_scale) is added to self.grads. `positions` (RoPE position ids) and
        `segment_starts` (the first position each query attends) pack several examples in
        one window (cpu backend; see Engine.set_layout)."""
        if not 0.0 < loss_scale <= _FLT_MAX:  # NaN fails too: it would poison every grad
            raise ConfigError(f"loss_scale must be a positive finite number, got {loss_scale!r}")
        loss = self.engine.forward_backward(_ids(tokens, "tokens"), _ids(targets, "targets"),
                                            loss_scale, weights, _opt_ids(positions, "positions"),
                                            _opt_ids(segment_starts, "segment_starts"))
        if self.active_ids is not None and self.grads is not None:
            # fold the compact classifier gradient into the full one at once, so that
            # self.grads is always the whole gradient
            self.grad_views[self._classifier_name][self.active_ids] += self._cls_grad
            self._cls_grad.fill(0.0)
        return loss

    def set_lora_dropout(self, p: float, key: int = 0):
        """Dropout with probability p on the adapters' input in the forward_backward calls
        that follow (PEFT's lora_dropout; cpu backend), with the masks of ``key``: give each
        microstep its own key. p 0: none. See Engine.set_lora_dropout."""
        try:
            self.engine.set_lora_dropout(p, key)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def loss(self, tokens, targets, *, weights=None, positions=None,
             segment_starts=None) -> float:
        """forward_backward's loss, forward only (evaluation): no gradient."""
        return self.engine.loss(_ids(tokens, "tokens"), _ids(targets, "targets"), weights,
                                _opt_ids(positions, "positions"),
                                _opt_ids(segment_starts, "segment_starts"))

    def logits(self, tokens, *, positions=None, segment_starts=None) -> np.ndarray:
        """Logits [seq_len, vocab] of one sequence (active columns only when compacted)."""
        return self.engine.logits(_ids(tokens, "tokens"), _opt_ids(positions, "positions"),
                                  _opt_ids(segment_starts, "segment_starts"))

    def zero_grad(self):
        self.trainable()[1].fill(0.0)

    def trainable(self):
        """(parameters, gradients, n_decay): the flat buffers the optimizer updates (the
        adapters' in a LoRA model), decayed on [0, n_decay). Adapters are not decayed, as
        with PEFT under HF's Trainer (weight_decay 0) and mlx-lm's LoRA."""
        if self.adapters is not None:
            return self.adapters.params, self.adapter_grads, 0
        return self.params, self.grads, self.n_decay

    def timings(self) -> dict:
        return self.engine.timings()

    @contextmanager
    def trace(self, path, *, microsteps: int = 16, rank=None):
        """Record the steps run inside the block and write them to ``path`` as a Chrome
        trace (Perfetto, chrome://tracing; docs/tracing.md). ``microsteps`` sizes the
        buffers; ``rank`` names the file of one rank (``FILE.rankN.json``). Yields the
        anecy.timeline.Recording."""
        from .timeline import Recording
        rec = Recording(self, microsteps, rank).start()
        try:
            yield rec
        finally:
            rec.stop()
        rec.write(path)

    # -- HF names and shapes ---------------------------------------------------------------
    def _hf_perm(self, name):
        """Row index that maps HF's (half) order onto this config's order, or None."""
        return hf_row_order(self.config, name, self.views[name].shape[0])

    def load_hf_state_dict(self, state_dict):
        """Copy weights given with HF names and shapes (numpy arrays or torch tensors).
        Every tensor is checked (names, shapes, finite values) before the first one is
        copied, so a refused state dict leaves the model exactly as it was."""
        if not hasattr(state_dict, "keys") or not hasattr(state_dict, "__getitem__"):
            raise ConfigError("a state dict must map tensor names to arrays")
        expected = {name for name, _, _ in self.layout}
        extra = set(state_dict) - expected
        if self.config.tie_embeddings:
            extra.discard("lm_head.weight")  # HF lists the tied head under its own name too
        extra = {k for k in extra if not str(k).endswith("rotary_emb.inv_freq")}
        missing = expected - set(state_dict)
        if missing:
            raise ConfigError(f"state dict lacks {len(missing)} tensor(s), "
                              f"e.g. {sorted(missing)[0]}")
        if extra:
            raise ConfigError(f"state dict has {len(extra)} unexpected tensor(s), e.g. "
                              f"{sorted(map(str, extra))[0]}")
        values = {}
        for name, shape, _ in self.layout:
            try:
                value = _to_numpy(state_dict[name])
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{name}: not an array of numbers ({e})") from None
            if value.shape != tuple(shape):
                raise ConfigError(f"{name}: expected shape {tuple(shape)}, got {value.shape}")
            if not np.isfinite(value).all():
                raise ConfigError(f"{name}: holds NaN or infinite values")
            values[name] = value
        for name, value in values.items():
            perm = self._hf_perm(name)
            self.views[name][...] = value if perm is None else value[perm]
        self.weights_changed()

    def _to_hf(self, views):
        out = {}
        for name, _, _ in self.layout:
            perm = self._hf_perm(name)
            value = views[name]
            if perm is None:
                out[name] = value.copy()
            else:
                hf = np.empty_like(value)
                hf[perm] = value
                out[name] = hf
        return out

    def hf_state_dict(self) -> dict:
        """Weights as {HF name: numpy array in HF's shape and row order} (copies)."""
        return self._to_hf(self.views)

    def hf_grads(self) -> dict:
        """Gradients, named and ordered as hf_state_dict()."""
        if self.grads is None:
            raise ConfigError("a LoRA model's base is frozen and has no gradients (its "
                              "adapters' are in adapter_grads)")
        return self._to_hf(self.grad_views)


def _ids(ids, name):
    """Token ids as given, refused unless integers (the engine would truncate 3.7 to 3)."""
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu":
        raise ConfigError(f"{name} must be integer token ids, got {arr.dtype}")
    return arr


def _opt_ids(ids, name):
    return None if ids is None else _ids(ids, name)


def _to_numpy(value):
    if hasattr(value, "detach"):  # a torch tensor; torch itself is never imported here
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)
