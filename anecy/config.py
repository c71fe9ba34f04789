"""Configuration: the shape of a Llama-family transformer (ModelConfig) and its presets,
and the run and optimiser settings (TrainConfig), each validated once, in __post_init__.
FLOP counts live here too, so reports and benchmarks count the same way."""

import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

from .backends import BACKENDS
from .errors import CheckpointError, ConfigError
from .trackers import NAMES as TRACKERS

ROPE_STYLES = ("interleaved", "half")

# The decoder (anecy.generate). The weights it decodes tokens from: fp32 (exact), or int8
# copies in blocks of 32 with a scale each (llama.cpp's q8_0), a quarter of the bytes to read
# per token (prompts always go through fp32). The threads it uses unless told: the cores this
# process may run on, at most MAX_DECODE_THREADS (a token's products are bound by memory
# bandwidth, which a few cores already fill).
DECODE_DTYPES = ("f32", "q8")
MAX_DECODE_THREADS = 8

# Under mpirun (anecy.distributed): seconds a rank waits for the others at an exchange before
# it stops the run, naming the ranks that did not come (--mpi-timeout).
MPI_TIMEOUT = 60.0


@dataclass
class ModelConfig:
    """Shape of a Llama-family model.

    ``head_dim`` defaults to ``dim // n_heads`` and ``n_kv_heads`` to ``n_heads``.
    ``rope_style`` is ``"interleaved"`` (pairs (2i, 2i+1), llama2.c checkpoints) or
    ``"half"`` (pairs (i, i + head_dim/2), HF Llama and Qwen3).
    """

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    seq_len: int
    n_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_style: str = "interleaved"
    qk_norm: bool = False
    tie_embeddings: bool = True
    residual_scale: float = 1.0

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and isinstance(self.dim, int) and isinstance(self.n_heads, int) \
                and self.n_heads > 0:
            if self.dim % self.n_heads:
                raise ConfigError(f"n_heads ({self.n_heads}) must divide dim ({self.dim}) "
                                  "unless head_dim is given")
            self.head_dim = self.dim // self.n_heads
        self.validate()

    def validate(self):
        """Raise ConfigError (a ValueError) naming the first field that cannot work."""
        for name in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "vocab_size", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.n_heads % self.n_kv_heads != 0:
            raise ConfigError(
                f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        if self.head_dim % 2 != 0:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_style not in ROPE_STYLES:
            raise ConfigError(f"rope_style must be one of {ROPE_STYLES}, got {self.rope_style!r}")
        for name in ("norm_eps", "rope_theta", "residual_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
                    or value == float("inf"):
                raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
        if self.vocab_size > 2**31 - 1 or self.seq_len > 2**20:
            raise ConfigError("vocab_size or seq_len is too large")

    # -- derived sizes -------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        """Channels of the query projection, n_heads * head_dim."""
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Channels of the key and value projections, n_kv_heads * head_dim."""
        return self.n_kv_heads * self.head_dim

    @property
    def n_params(self) -> int:
        per_layer = (self.q_dim * self.dim + 2 * self.kv_dim * self.dim + self.dim * self.q_dim
                     + 3 * self.dim * self.hidden_dim + 2 * self.dim
                     + (2 * self.head_dim if self.qk_norm else 0))
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return emb + self.n_layers * per_layer + self.dim

    # -- comparison ------------------------------------------------------------------------
    # The fields that decide what a model's weights are and mean, whatever file holds them
    # (seq_len is only the training window; rope_style and residual_scale say how a format's
    # weights are read, which each reader checks for itself).
    WEIGHT_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "vocab_size", "qk_norm", "tie_embeddings", "norm_eps", "rope_theta")

    def differences(self, other: "ModelConfig", names=None) -> list:
        """The names of the fields (``names``, default all) in which ``other`` differs."""
        names = names or [f.name for f in fields(self)]
        return [n for n in names if getattr(self, n) != getattr(other, n)]

    def require_same(self, theirs: "ModelConfig", source, names=None, *, than: str = "",
                     advice: str = ""):
        """CheckpointError "<source> holds another model<than> (differs in ...)<advice>"
        unless ``theirs`` (the model in ``source``) agrees on ``names`` (default: all)."""
        diff = self.differences(theirs, names)
        if diff:
            raise CheckpointError(f"{source} holds another model{than} (differs in "
                                  f"{', '.join(diff)}){advice}")

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config field(s): {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """A named configuration; keyword arguments override its fields."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        d = dict(PRESETS[name])
        d.update(overrides)
        return cls(**d)


_STORIES = dict(vocab_size=32000, seq_len=256, norm_eps=1e-5, rope_theta=10000.0,
                rope_style="interleaved", qk_norm=False, tie_embeddings=True)

_QWEN3 = dict(vocab_size=151936, seq_len=256, norm_eps=1e-6, rope_theta=1e6, rope_style="half",
              qk_norm=True, tie_embeddings=True)

PRESETS = {
    # llama2.c's stories110M.bin
    "stories110m": dict(dim=768, hidden_dim=2048, n_layers=12, n_heads=12, **_STORIES),
    # llama2.c's stories15M.bin
    "stories15m": dict(dim=288, hidden_dim=768, n_layers=6, n_heads=6, **_STORIES),
    # seconds-fast, same features as the stories models (Llama-2 vocabulary)
    "tiny": dict(_STORIES, dim=64, hidden_dim=176, n_layers=2, n_heads=4, seq_len=64),
    # Qwen/Qwen3-0.6B, trained on sequences of 256
    "qwen3-0.6b": dict(_QWEN3, dim=1024, hidden_dim=3072, n_layers=28, n_heads=16,
                       n_kv_heads=8, head_dim=128),
    # seconds-fast, same features as Qwen3-0.6B (GQA 2:1, head_dim != dim / n_heads)
    "qwen3-tiny": dict(_QWEN3, dim=64, hidden_dim=192, n_layers=2, n_heads=4, n_kv_heads=2,
                       head_dim=32, seq_len=64),
}


@dataclass
class TrainConfig:
    """Optimisation and run settings (defaults follow the public reference)."""
    steps: int = 10000              # microsteps
    lr: float = 3e-4
    min_lr_frac: float = 0.1        # cosine decays to min_lr_frac * lr
    warmup: int = 100               # microsteps of linear warmup
    accum: int = 10                 # microsteps per optimizer update
    clip: float = 1.0               # global grad-norm clip; 0 turns it off
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    loss_scale: Optional[float] = None  # static loss scale; None: the backend's default
                                        # (backends.DEFAULT_LOSS_SCALE, dynamic on fp16
                                        # backends); unscaled before clip
    loss_scale_growth: int = 2000   # clean updates before a dynamic loss scale doubles
    seed: int = 0
    compact_vocab: bool = True
    ckpt_path: Optional[str] = None
    ckpt_every: int = 100           # microsteps between checkpoints; 0: only at the end
    metrics_path: Optional[str] = None
    eval_every: int = 0             # microsteps between validation losses; 0: never
    eval_batches: int = 4
    backend: str = "auto"
    data_path: Optional[str] = None
    init_from: Optional[str] = None  # initial weights: an HF directory or a llama2.c .bin
    sample_every: int = 0           # microsteps between decoded samples; 0: never
    tokenizer: Optional[str] = None  # decodes samples (default: the data's sidecar's)
    trackers: tuple[str, ...] = ()  # experiment trackers the run reports to (trackers.NAMES)
    report_dir: Optional[str] = None  # where they write (default runs/<checkpoint stem>)

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if isinstance(self.trackers, list):   # as a checkpoint's JSON holds it
            self.trackers = tuple(self.trackers)
        self.validate()

    def validate(self):
        def need(ok, name, what):
            if not ok:
                raise ConfigError(f"{name} must be {what}, got {getattr(self, name)!r}")

        def number(name):
            v = getattr(self, name)
            return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)

        def integer(name):
            v = getattr(self, name)
            return isinstance(v, int) and not isinstance(v, bool)

        need(integer("steps") and self.steps >= 1, "steps", "a positive integer")
        need(integer("accum") and self.accum >= 1, "accum", "a positive integer")
        for name in ("warmup", "ckpt_every", "eval_every", "sample_every", "seed"):
            need(integer(name) and getattr(self, name) >= 0, name, "a non-negative integer")
        need(integer("eval_batches") and self.eval_batches >= 1, "eval_batches",
             "a positive integer")
        need(number("lr") and self.lr > 0, "lr", "a positive number")
        need(number("min_lr_frac") and 0 <= self.min_lr_frac <= 1, "min_lr_frac",
             "between 0 and 1")
        need(number("clip") and self.clip >= 0, "clip", "a non-negative number")
        need(number("weight_decay") and self.weight_decay >= 0, "weight_decay",
             "a non-negative number")
        need(number("eps") and self.eps > 0, "eps", "a positive number")
        need(self.loss_scale is None or (number("loss_scale") and self.loss_scale > 0),
             "loss_scale", "a positive finite number")
        need(integer("loss_scale_growth") and self.loss_scale_growth >= 1, "loss_scale_growth",
             "a positive integer")
        need(len(self.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1
                                          for b in self.betas), "betas", "two numbers in [0, 1)")
        need(self.backend in ("auto",) + BACKENDS, "backend",
             "one of auto, " + ", ".join(BACKENDS))
        need(isinstance(self.trackers, tuple) and set(self.trackers) <= set(TRACKERS),
             "trackers", "a tuple of " + ", ".join(TRACKERS))

    def lr_at(self, step: int) -> float:
        """Learning rate for an update made after `step` microsteps (1-based)."""
        if self.warmup and step < self.warmup:
            return self.lr * step / self.warmup
        span = max(1, self.steps - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        floor = self.min_lr_frac * self.lr
        return floor + 0.5 * (self.lr - floor) * (1.0 + math.cos(math.pi * progress))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        d["trackers"] = list(self.trackers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def layer_flops(cfg: ModelConfig, seq_len: Optional[int] = None) -> int:
    """Forward FLOPs of one transformer layer over one sequence (attention unmasked)."""
    S = cfg.seq_len if seq_len is None else seq_len
    D, H, Q, K = cfg.dim, cfg.hidden_dim, cfg.q_dim, cfg.kv_dim
    proj = 2 * S * (D * Q + 2 * D * K + Q * D + 3 * D * H)
    attn = 4 * cfg.n_heads * S * S * cfg.head_dim
    return proj + attn


def step_flops(cfg: ModelConfig, active_vocab: Optional[int] = None,
               seq_len: Optional[int] = None) -> int:
    """Training FLOPs of one microstep (forward + backward = 3 x forward)."""
    S = cfg.seq_len if seq_len is None else seq_len
    V = cfg.vocab_size if active_vocab is None else active_vocab
    forward = cfg.n_layers * layer_flops(cfg, S) + 2 * S * cfg.dim * V
    return 3 * forward
