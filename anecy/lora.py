"""LoRA adapters: their configuration, their one flat buffer, PEFT directories out and in,
fusing them into a model, and the checkpoint of a LoRA run.

The math is PEFT's: a targeted projection W0 [out, in] computes y = W0 x + s * B (A x) with
A [R, in], B [out, R] and s = alpha / R. A starts Kaiming-uniform (PEFT's default, as
``torch.nn.init.kaiming_uniform_(a=sqrt(5))``: uniform in +-1/sqrt(in)) and B at zero, so the
adapted model starts equal to its base.

Row order. anecy's Model keeps the rows of q_proj and k_proj in its config's RoPE order and
permutes them only at the HF boundary (``Model.load_hf_state_dict``). Adapters follow the
same rule: in ``LoraAdapters.params`` the rows of q_proj's and k_proj's B matrices are in the
Model's order (so ``W + s * B @ A`` is computed on the Model's own views, with no permutation
in the engine), and they are permuted to HF's order when written to, or read from, a PEFT
directory (``peft_state_dict`` / ``load_peft_state_dict``). A matrices (input side) and every
other target are the same in both orders. For ``rope_style="half"`` configs (HF Llama, Qwen3)
the orders agree and nothing is permuted."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import jsonio
from .config import ModelConfig
from .errors import CheckpointError, ConfigError
from .model import hf_row_order, layer_tensors

# PEFT's names of the seven projections of a Llama layer, in the order of a layer's tensors
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."     # PEFT's prefix of a causal LM's module names
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _target_of(hf_name: str) -> str:
    """q_proj of "self_attn.q_proj.weight"."""
    return hf_name.split(".")[-2]


@dataclass
class LoraConfig:
    """Which projections get adapters, and their size.

    ``rank`` R and ``alpha`` as PEFT's ``r`` and ``lora_alpha`` (the update is scaled by
    alpha / R; alpha defaults to 2R), ``targets`` by PEFT's module names (default all seven),
    ``layers`` the number of last layers adapted, as mlx-lm's ``--num-layers`` (None: all),
    and ``dropout`` the probability with which the adapters' input is dropped in training."""

    rank: int = 8
    alpha: float | None = None
    targets: tuple = TARGETS
    layers: int | None = None
    dropout: float = 0.0

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        else:
            self.targets = tuple(self.targets)
        if self.alpha is None and _is_int(self.rank):
            self.alpha = 2 * self.rank
        self.validate()
        self.targets = tuple(t for t in TARGETS if t in self.targets)   # one order: TARGETS'

    def validate(self):
        """Raise ConfigError naming the first field that cannot work (any model)."""
        if not _is_int(self.rank) or self.rank <= 0:
            raise ConfigError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not _is_number(self.alpha) or not 0 < self.alpha < math.inf:
            raise ConfigError(f"LoRA alpha must be a positive finite number, got {self.alpha!r}")
        if not self.targets:
            raise ConfigError("LoRA targets must name at least one of " + ", ".join(TARGETS))
        for t in self.targets:
            if t not in TARGETS:
                raise ConfigError(f"LoRA target {t!r} is not a projection of a Llama-family "
                                  f"layer (the targets are {', '.join(TARGETS)})")
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"LoRA targets name a projection twice: {','.join(self.targets)}")
        if self.layers is not None and (not _is_int(self.layers) or self.layers <= 0):
            raise ConfigError(f"LoRA layers must be a positive integer (the last N layers), "
                              f"got {self.layers!r}")
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def scale(self) -> float:
        """The factor of the low-rank update, alpha / rank (PEFT's ``scaling``)."""
        return float(self.alpha) / self.rank

    def layer_ids(self, model_cfg: ModelConfig) -> range:
        """The adapted layers: the last ``layers`` of the model (all when None)."""
        n = model_cfg.n_layers if self.layers is None else self.layers
        return range(model_cfg.n_layers - n, model_cfg.n_layers)

    def check(self, model_cfg: ModelConfig):
        """Raise ConfigError unless these adapters fit ``model_cfg``: layers in range, the
        rank no larger than any targeted projection's smaller side."""
        self.validate()
        if self.layers is not None and self.layers > model_cfg.n_layers:
            raise ConfigError(f"LoRA layers {self.layers} is more than the model's "
                              f"{model_cfg.n_layers} layers")
        mats, _ = layer_tensors(model_cfg)
        for _, name, (out_dim, in_dim) in mats:
            if _target_of(name) in self.targets and self.rank > min(out_dim, in_dim):
                raise ConfigError(f"LoRA rank {self.rank} is larger than {_target_of(name)} "
                                  f"({out_dim} x {in_dim}) allows (at most "
                                  f"{min(out_dim, in_dim)})")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LoraConfig:
        if not isinstance(d, dict):
            raise ConfigError("a LoRA config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown LoRA config field(s): {', '.join(unknown)}")
        return cls(**d)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# -- the flat buffer -------------------------------------------------------------------------
class LoraTensor(NamedTuple):
    """One adapter matrix: its PEFT name, place in the model and in the flat buffer."""
    name: str          # PEFT's name: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
    layer: int         # the layer it adapts
    target: str        # PEFT's module name (q_proj, ...)
    field: str         # the engine's name of the adapted matrix (wq, ...)
    weight: str        # the adapted matrix's HF name in the Model (model.layers.0.self_attn...)
    part: str          # "A" ([R, in], the input side) or "B" ([out, R])
    shape: tuple
    offset: int        # first element in the flat fp32 buffer

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]


def lora_layout(model_cfg: ModelConfig, lora_cfg: LoraConfig) -> list:
    """[LoraTensor] in buffer order: layer by layer (ascending), within a layer the targets
    in the order of ``TARGETS`` (the order of the Model's matrices), A then B for each.
    Every tensor is C-contiguous in one fp32 buffer of ``sum(t.size)`` elements, so a
    layer's adapters are one contiguous range."""
    lora_cfg.check(model_cfg)
    R = lora_cfg.rank
    mats, _ = layer_tensors(model_cfg)
    out, off = [], 0
    for l in lora_cfg.layer_ids(model_cfg):
        for field, name, (out_dim, in_dim) in mats:
            target = _target_of(name)
            if target not in lora_cfg.targets:
                continue
            module = name[:-len(".weight")]
            for part, shape in (("A", (R, in_dim)), ("B", (out_dim, R))):
                out.append(LoraTensor(f"{PEFT_PREFIX}model.layers.{l}.{module}.lora_{part}.weight",
                                      l, target, field, f"model.layers.{l}.{name}", part, shape,
                                      off))
                off += shape[0] * shape[1]
    return out


def _shape_mismatch(t: LoraTensor, shape) -> str:
    """Why a tensor of ``shape`` is not ``t``: a rank other than the config's, or a model of
    another shape."""
    rank_axis = 0 if t.part == "A" else 1
    if len(shape) == 2 and shape[1 - rank_axis] == t.shape[1 - rank_axis]:
        return (f"has rank {shape[rank_axis]}, the adapter's config says r="
                f"{t.shape[rank_axis]} (shape {tuple(shape)}, expected {t.shape})")
    return f"has shape {tuple(shape)}: the adapter is for another model (this one needs {t.shape})"


class LoraAdapters:
    """The adapters of one model: a LoraConfig, its layout, and the adapters in one flat fp32
    buffer (``params``) with a view per tensor (``views``, by PEFT name), in the Model's row
    order (see the module's docstring). New adapters start as PEFT starts them."""

    def __init__(self, model_config: ModelConfig, lora_config: LoraConfig, seed: int = 0):
        self.model_config, self.config = model_config, lora_config
        self.layout = lora_layout(model_config, lora_config)
        self.params = np.zeros(sum(t.size for t in self.layout), np.float32)
        self.views = {t.name: self.params[t.offset:t.offset + t.size].reshape(t.shape)
                      for t in self.layout}
        # {(layer, engine field): (A's LoraTensor, B's)}: the two adapters of one matrix
        # (layout order puts A right before its B)
        self.pairs = {(a.layer, a.field): (a, b)
                      for a, b in zip(self.layout[0::2], self.layout[1::2])}
        self.init_weights(seed)

    @property
    def scale(self) -> float:
        return self.config.scale

    def init_weights(self, seed: int = 0):
        """PEFT's initialisation: A uniform in +-1/sqrt(in) (torch's kaiming_uniform_ with
        a=sqrt(5) on a [R, in] weight), B zero; drawn in layout order from one seeded
        generator."""
        rng = np.random.Generator(np.random.PCG64(seed))
        for t in self.layout:
            view = self.views[t.name]
            if t.part == "B":
                view[...] = 0.0
                continue
            bound = np.float32(1.0 / math.sqrt(t.shape[1]))
            view[...] = (rng.random(t.shape, dtype=np.float32) * 2 - 1) * bound

    # -- PEFT's tensors (HF row order) --------------------------------------------------------
    def _hf_rows(self, t: LoraTensor):
        return None if t.part == "A" else hf_row_order(self.model_config, t.weight, t.shape[0])

    def peft_state_dict(self) -> dict:
        """{PEFT name: array in HF's row order} (copies), as adapter_model.safetensors."""
        out = {}
        for t in self.layout:
            value, perm = self.views[t.name], self._hf_rows(t)
            if perm is None:
                out[t.name] = value.copy()
            else:
                out[t.name] = np.empty_like(value)
                out[t.name][perm] = value
        return out

    def load_peft_state_dict(self, state_dict, where: str = "adapter"):
        """Copy PEFT-named tensors in HF's row order. Every tensor is checked (names, shapes,
        finite values) before the first is copied: a refused one leaves the adapters as they
        were."""
        names = {t.name for t in self.layout}
        missing = sorted(names - set(state_dict))
        extra = sorted(set(state_dict) - names)
        if missing:
            raise CheckpointError(f"{where} lacks {len(missing)} LoRA tensor(s) of this "
                                  f"configuration, e.g. {missing[0]}")
        if extra:
            raise CheckpointError(f"{where} has {len(extra)} tensor(s) this configuration "
                                  f"does not, e.g. {extra[0]}")
        values = {}
        for t in self.layout:
            value = np.asarray(state_dict[t.name], np.float32)
            if value.shape != t.shape:
                raise CheckpointError(f"{where}: {t.name} {_shape_mismatch(t, value.shape)}")
            if not np.isfinite(value).all():
                raise CheckpointError(f"{where}: {t.name} holds NaN or infinite values")
            values[t.name] = value
        for t in self.layout:
            perm = self._hf_rows(t)
            self.views[t.name][...] = values[t.name] if perm is None else values[t.name][perm]

    # -- fusing -------------------------------------------------------------------------------
    def deltas(self, hf_order: bool = False):
        """(adapted matrix's HF name, s * B @ A) for every adapted matrix, in the Model's row
        order (HF's with ``hf_order``); one [out, in] product at a time."""
        for ta, tb in self.pairs.values():
            delta = self.views[tb.name] @ self.views[ta.name]
            delta *= np.float32(self.scale)
            if hf_order:
                perm = self._hf_rows(tb)
                if perm is not None:
                    hf = np.empty_like(delta)
                    hf[perm] = delta
                    delta = hf
            yield tb.weight, delta


def fuse(model, adapters: LoraAdapters, *, inplace: bool = False):
    """The Model with W0 + s * B @ A in place of every adapted matrix: ``model`` itself with
    ``inplace``, else a new Model on the same backend (``model`` is left alone)."""
    _check_same_shape(model.config, adapters.model_config)
    if not inplace:
        from .model import Model
        fused = Model(model.config, backend=model.backend)
        fused.params[...] = model.params
        if model.active_ids is not None:
            fused.set_active_vocab(model.active_ids)
        model = fused
    for weight, delta in adapters.deltas():
        model.views[weight] += delta
    model.weights_changed()
    return model


def fuse_state_dict(state_dict: dict, adapters: LoraAdapters) -> dict:
    """A copy of an HF state dict (HF names and row order) with every adapted matrix fused."""
    out = dict(state_dict)
    for weight, delta in adapters.deltas(hf_order=True):
        if weight not in out:
            raise ConfigError(f"the state dict has no {weight} to fuse an adapter into")
        base = np.asarray(out[weight], np.float32)
        if base.shape != delta.shape:
            raise ConfigError(f"{weight}: shape {base.shape}, the adapter's update is "
                              f"{delta.shape}")
        out[weight] = base + delta
    return out


_SHAPE_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                 "vocab_size", "qk_norm", "tie_embeddings", "rope_style")


def _check_same_shape(ours: ModelConfig, theirs: ModelConfig, what="the adapters"):
    diff = [f for f in _SHAPE_FIELDS if getattr(ours, f) != getattr(theirs, f)]
    if diff:
        raise ConfigError(f"{what} were made for another model (differs in {', '.join(diff)})")


# -- the base's identity ---------------------------------------------------------------------
HASH = "sha256"          # fastest of hashlib's sha256 / blake2b on the x86-64 machines measured
_HASH_CHUNK = 4 << 20


def base_hash(model) -> str:
    """``"sha256:<hex>"`` of the Model's weights: its layout (names, shapes) and its flat
    fp32 buffer, streamed a chunk at a time (no copy). Identifies a LoRA run's base."""
    h = hashlib.new(HASH)
    h.update(json.dumps([[n, list(s)] for n, s, _ in model.layout]).encode())
    raw = memoryview(model.params.view(np.uint8))
    for i in range(0, len(raw), _HASH_CHUNK):
        h.update(raw[i:i + _HASH_CHUNK])
    return f"{HASH}:{h.hexdigest()}"


# -- PEFT directories ------------------------------------------------------------------------
# adapter_config.json holds every field of peft.LoraConfig of this PEFT version (the one the
# tests compare with); its peft_version says which version's fields they are
PEFT_VERSION = "0.21.2"


def peft_config(lora_cfg: LoraConfig, model_cfg: ModelConfig, base_name_or_path) -> dict:
    """adapter_config.json as PEFT writes it for a LoraConfig of a causal LM: every field of
    peft.LoraConfig with PEFT's defaults, but for those these adapters set."""
    layers = lora_cfg.layer_ids(model_cfg)
    all_layers = len(layers) == model_cfg.n_layers
    return {
        "alora_invocation_tokens": None,
        "alpha_pattern": {},
        "arrow_config": None,
        "auto_mapping": None,
        "base_model_name_or_path": None if base_name_or_path is None else str(base_name_or_path),
        "bias": "none",
        "corda_config": None,
        "ensure_weight_tying": False,
        "eva_config": None,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "kasa_config": None,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None if all_layers else list(layers),
        "loftq_config": {},
        "lora_alpha": lora_cfg.alpha,
        "lora_bias": False,
        "lora_dropout": lora_cfg.dropout,
        "lora_ga_config": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "monteclora_config": None,
        "peft_type": "LORA",
        "peft_version": PEFT_VERSION,
        "qalora_group_size": 16,
        "r": lora_cfg.rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted(lora_cfg.targets),
        "target_parameters": None,
        "task_type": "CAUSAL_LM",
        "trainable_token_indices": None,
        "use_bdlora": None,
        "use_dora": False,
        "use_qalora": False,
        "use_rslora": False,
        "velora_config": None,
    }


def save_peft(path, adapters: LoraAdapters, base_name_or_path=None):
    """Write adapters as PEFT saves them: ``path/adapter_config.json`` and
    ``path/adapter_model.safetensors`` (fp32, HF row order), each atomically."""
    from .fileio import atomic_write
    from .hf import write_safetensors
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / ADAPTER_WEIGHTS, adapters.peft_state_dict())
    doc = peft_config(adapters.config, adapters.model_config, base_name_or_path)
    with atomic_write(path / ADAPTER_CONFIG) as f:
        f.write(json.dumps(doc, indent=2, sort_keys=True).encode())


def _peft_modules(doc, model_cfg: ModelConfig, where):
    """(targets, layers) of LoraConfig for the modules an adapter_config.json selects, matched
    as PEFT matches them: a module whose name equals a ``target_modules`` entry or ends with
    "." + the entry (so ``q_proj`` and ``model.layers.0.self_attn.q_proj`` both work; PEFT
    writes ``all-linear`` out as full names), in the layers of ``layers_to_transform``.
    anecy adapts the same targets in each of the last N layers: any other selection, or an
    entry that is no projection of the model, is a CheckpointError."""
    entries = doc.get("target_modules")
    if entries == "all-linear":   # PEFT: every linear layer but the output head
        entries = list(TARGETS)
    if not isinstance(entries, list) or not entries \
            or not all(isinstance(e, str) for e in entries):
        raise CheckpointError(f"{where}: target_modules must be a list of module names "
                              f"(anecy reads no patterns), got {entries!r}")
    layer_ids = doc.get("layers_to_transform")
    if _is_int(layer_ids):
        layer_ids = [layer_ids]
    if layer_ids is not None and (not isinstance(layer_ids, list)
                                  or not all(_is_int(i) for i in layer_ids)):
        raise CheckpointError(f"{where}: layers_to_transform must be a layer index or a list "
                              f"of them, got {doc['layers_to_transform']!r}")
    mats, _ = layer_tensors(model_cfg)
    modules = {f"model.layers.{l}.{name[:-len('.weight')]}": (l, _target_of(name))
               for l in range(model_cfg.n_layers) for _, name, _ in mats}
    selected = set()
    for entry in entries:
        hits = {key for module, key in modules.items()
                if module == entry or module.endswith("." + entry)}
        if not hits:
            raise CheckpointError(f"{where}: target_modules names {entry!r}, which is not a "
                                  f"projection of this model ({', '.join(TARGETS)} of its "
                                  f"{model_cfg.n_layers} layers)")
        selected |= hits
    if layer_ids is not None:
        selected = {(l, t) for l, t in selected if l in layer_ids}
    layers = sorted({l for l, _ in selected})
    targets = tuple(t for t in TARGETS if any(t == s for _, s in selected))
    L = model_cfg.n_layers
    if not selected or layers != list(range(L - len(layers), L)) \
            or len(selected) != len(layers) * len(targets):
        raise CheckpointError(f"{where}: adapts {len(selected)} projection(s) that are not the "
                              f"same targets in each of the last N layers (what anecy adapts)")
    return targets, (None if len(layers) == L else len(layers))


# PEFT options that change what the adapters compute: refused unless absent, null or
# (the predicate) at a value that computes what anecy computes
_REFUSED = {
    "use_dora": lambda v: v is False, "use_rslora": lambda v: v is False,
    "fan_in_fan_out": lambda v: v is False, "bias": lambda v: v == "none",
    "lora_bias": lambda v: v is False, "rank_pattern": lambda v: v == {},
    "alpha_pattern": lambda v: v == {}, "modules_to_save": lambda v: v in ([], None),
    "exclude_modules": lambda v: v in ([], None, ""), "layer_replication": lambda v: False,
    "trainable_token_indices": lambda v: False, "target_parameters": lambda v: v == [],
    "use_qalora": lambda v: v is False, "alora_invocation_tokens": lambda v: False,
}


def lora_config_from_peft(doc, model_cfg: ModelConfig, where="adapter_config.json"):
    """The LoraConfig of an adapter_config.json dict, checked against ``model_cfg``; anything
    anecy would compute differently from PEFT is a CheckpointError naming it."""
    if not isinstance(doc, dict):
        raise CheckpointError(f"{where}: must hold a JSON object")
    peft_type = doc.get("peft_type")
    if peft_type != "LORA":
        raise CheckpointError(f"{where}: peft_type {peft_type!r}, anecy reads LoRA adapters "
                              "(peft_type 'LORA')")
    if doc.get("task_type") not in (None, "CAUSAL_LM"):
        raise CheckpointError(f"{where}: task_type {doc['task_type']!r}, anecy reads adapters "
                              "of causal language models (CAUSAL_LM)")
    for key, ok in _REFUSED.items():
        if doc.get(key) is not None and not ok(doc[key]):
            raise CheckpointError(f"{where}: {key} {doc[key]!r} is not supported")
    targets, layers = _peft_modules(doc, model_cfg, where)
    # absent fields take peft.LoraConfig's defaults
    r, alpha, dropout = doc.get("r", 8), doc.get("lora_alpha", 8), doc.get("lora_dropout", 0.0)
    try:
        cfg = LoraConfig(rank=r, alpha=alpha, targets=targets, layers=layers, dropout=dropout)
        cfg.check(model_cfg)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return cfg


def read_peft(path, model_cfg: ModelConfig) -> LoraAdapters:
    """The adapters of a PEFT directory (adapter_config.json + adapter_model.safetensors,
    or the older adapter_model.bin is refused), checked against ``model_cfg``: peft type,
    options, every tensor's name and shape. CheckpointError names the first problem."""
    from .hf import read_safetensors
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"adapter {path}: not a directory")
    cfg_file, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not cfg_file.is_file():
        raise CheckpointError(f"adapter {path}: no {ADAPTER_CONFIG} (not a PEFT adapter "
                              "directory)")
    try:
        doc = jsonio.loads(cfg_file.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise CheckpointError(f"{cfg_file}: not valid JSON") from None
    except OSError as e:
        raise CheckpointError(f"{cfg_file}: cannot read ({e.strerror or e})") from None
    lora_cfg = lora_config_from_peft(doc, model_cfg, str(cfg_file))
    if not weights.is_file():
        other = " (adapter_model.bin is PyTorch's pickle format, which anecy does not read)" \
            if (path / "adapter_model.bin").exists() else ""
        raise CheckpointError(f"adapter {path}: no {ADAPTER_WEIGHTS}{other}")
    adapters = LoraAdapters(model_cfg, lora_cfg)
    adapters.load_peft_state_dict(read_safetensors(weights), str(weights))
    return adapters


# -- checkpoints of a LoRA run ---------------------------------------------------------------
LORA_CHECKPOINT = "anecy-lora"   # meta["kind"] of a LoRA run's checkpoint
# the arrays a LoRA checkpoint may hold: never a base weight
LORA_ARRAYS = ("adapters", "adam_m", "adam_v", "grads", "active_ids")
_RESERVED = ("kind", "model_config", "lora_config", "base")


def save_lora_checkpoint(path, adapters: LoraAdapters, base: dict, adam_m, adam_v,
                         state: dict, *, grads=None, active_ids=None, fsync: bool = True):
    """Write a LoRA run's checkpoint (atomically, see anecy.checkpoint); its contents are
    ``lora_checkpoint_contents``'."""
    from .checkpoint import save_checkpoint
    save_checkpoint(path, *lora_checkpoint_contents(adapters, base, adam_m, adam_v, state,
                                                    grads=grads, active_ids=active_ids),
                    fsync=fsync)


def lora_checkpoint_contents(adapters: LoraAdapters, base: dict, adam_m, adam_v, state: dict,
                             *, grads=None, active_ids=None):
    """(meta, arrays) of a LoRA run's checkpoint, checked: the adapters' flat
    buffer and its two Adam moments (and the gradients, mid-accumulation), with meta
    ``{"kind": "anecy-lora", "model_config", "lora_config", "base": {"path", "hash"},
    **state}``; ``state`` is the run's state as a training checkpoint's meta holds it (it
    must give ``step`` and ``loss_scale``; the data sampler's RNG under ``sampler``). The
    base's weights are never written: the base is named by path and content hash."""
    if not isinstance(base, dict) or not isinstance(base.get("path"), str) \
            or not isinstance(base.get("hash"), str):
        raise ConfigError("base must be {'path': str, 'hash': str} (see base_hash)")
    clash = sorted(set(state) & set(_RESERVED))
    if clash:
        raise ConfigError(f"state must not set {', '.join(clash)}")
    if not _is_int(state.get("step")) or state["step"] < 0:
        raise ConfigError(f"state['step'] must be a non-negative integer, got "
                          f"{state.get('step')!r}")
    if not _is_number(state.get("loss_scale")) or not 0 < state["loss_scale"] < math.inf:
        raise ConfigError(f"state['loss_scale'] must be a positive finite number, got "
                          f"{state.get('loss_scale')!r}")
    arrays = {"adapters": adapters.params, "adam_m": adam_m, "adam_v": adam_v}
    if grads is not None:
        arrays["grads"] = grads
    for name, a in arrays.items():
        if not isinstance(a, np.ndarray) or a.dtype != np.float32 \
                or a.shape != adapters.params.shape:
            raise ConfigError(f"{name} must be a float32 array shaped like the adapters "
                              f"{adapters.params.shape}")
    if active_ids is not None:
        arrays["active_ids"] = np.asarray(active_ids, np.int32)
    meta = {"kind": LORA_CHECKPOINT, "model_config": adapters.model_config.to_dict(),
            "lora_config": adapters.config.to_dict(), "base": dict(base), **state}
    return meta, arrays


def read_lora_checkpoint_meta(path):
    """(meta, ModelConfig, LoraConfig) of a LoRA checkpoint, from its header alone."""
    from .checkpoint import read_checkpoint_meta
    head = read_checkpoint_meta(path)
    meta = head["meta"]
    if meta.get("kind") != LORA_CHECKPOINT:
        raise CheckpointError(f"checkpoint {path}: not a LoRA checkpoint (kind "
                              f"{meta.get('kind')!r})")
    try:
        model_cfg = ModelConfig.from_dict(meta["model_config"])
        lora_cfg = LoraConfig.from_dict(meta["lora_config"])
        lora_cfg.check(model_cfg)
    except (ConfigError, TypeError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path}: bad model or LoRA config ({e})") from None
    base = meta.get("base")
    if not isinstance(base, dict) or not isinstance(base.get("path"), str) \
            or not isinstance(base.get("hash"), str):
        raise CheckpointError(f"checkpoint {path}: names no base (path and hash)")
    extra = sorted(set(head["arrays"]) - set(LORA_ARRAYS))
    if extra:
        raise CheckpointError(f"checkpoint {path}: holds {extra[0]!r}, which a LoRA "
                              "checkpoint never does")
    return meta, model_cfg, lora_cfg


def load_lora_checkpoint(path, base_hash: str | None = None, into: dict | None = None):
    """(meta, LoraAdapters, arrays) of a LoRA checkpoint: the adapters loaded into a new
    LoraAdapters, ``arrays`` the others (adam_m, adam_v, and grads and active_ids when
    saved), or ``into``'s preallocated arrays filled in place (as anecy.checkpoint's
    load_checkpoint). With ``base_hash``, a checkpoint of another base is refused before
    its payload is read. Every float array must be finite."""
    from .checkpoint import load_checkpoint
    meta, model_cfg, lora_cfg = read_lora_checkpoint_meta(path)
    if base_hash is not None and meta["base"]["hash"] != base_hash:
        raise CheckpointError(f"checkpoint {path} adapts another base than the one given "
                              f"(it was trained on {meta['base']['path']}, whose weights "
                              "differ from these)")
    adapters = LoraAdapters(model_cfg, lora_cfg)
    dest = dict(into or {})
    dest["adapters"] = adapters.params
    _, arrays = load_checkpoint(path, into=dest)
    for name in ("adapters", "adam_m", "adam_v"):
        if name not in arrays:
            raise CheckpointError(f"checkpoint {path}: has no {name}")
    for name, a in arrays.items():
        if a.dtype.kind == "f" and a.shape != adapters.params.shape:
            raise CheckpointError(f"checkpoint {path}: {name} has shape {a.shape}, the "
                                  f"adapters {adapters.params.shape}")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise CheckpointError(f"checkpoint {path}: {name} holds NaN or infinite values")
    arrays.pop("adapters")
    return meta, adapters, arrays
