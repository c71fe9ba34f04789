"""Model weights from every source anecy reads, found in one place: an anecy training
checkpoint, a LoRA checkpoint (its base, named inside it, with its adapters fused), a llama2.c
``.bin`` file, or a Hugging Face directory; and the tokenizer that goes with them.

A training checkpoint holds the whole model (with vocabulary compaction too: only the
classifier's softmax was restricted, every row is stored), its model config, the active
vocabulary (the tokens its softmax ran over; loading it sets the Model's active_ids, which
decoding respects and exports ignore) and the data it was trained on, whose sidecar names the
tokenizer."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .checkpoint import TRAINING_CHECKPOINT, load_checkpoint, read_checkpoint_meta
from .config import ModelConfig
from .corpus import NAME as BUILTIN_DATA
from .errors import AnecyError, CheckpointError, ConfigError, cannot_read
from .model import Model


@dataclass
class Source:
    """Where a model's weights come from, read from its header alone."""
    path: Path
    kind: str                    # "checkpoint" | "lora" | "llama2c" | "hf"
    config: ModelConfig          # seq_len: the context length the model was made for
    meta: dict = field(default_factory=dict)   # a training checkpoint's meta

    @property
    def describe(self) -> str:
        what = {"checkpoint": "anecy checkpoint", "lora": "anecy LoRA checkpoint",
                "llama2c": "llama2.c checkpoint", "hf": "Hugging Face directory"}[self.kind]
        return f"{what} {self.path}"


def inspect(path, kind: str = "auto") -> Source:
    """The Source at ``path``: a directory is HF, a file an anecy training or LoRA checkpoint
    (by its magic) or else a llama2.c file. ``kind`` "checkpoint" accepts anecy checkpoints
    only; "init" (pretrained weights) and "auto" accept all four."""
    path = Path(path)
    if not path.exists():
        from .fileio import missing
        why = missing(path)
        raise CheckpointError(f"{path}: " + ("no such file or directory"
                                            if why == "no such file" else why))
    if path.is_dir():
        if kind == "checkpoint":
            raise CheckpointError(f"{path}: is a directory, not an anecy checkpoint")
        from .hf import config_from_hf, read_config
        hf = read_config(path)
        context = hf.get("max_position_embeddings") or 2048
        return Source(path, "hf", config_from_hf(hf, seq_len=int(context)))
    if _is_anecy_checkpoint(path):
        meta = read_checkpoint_meta(path)["meta"]
        from .lora import LORA_CHECKPOINT, read_lora_checkpoint_meta
        if meta.get("kind") == LORA_CHECKPOINT:
            meta, cfg, _ = read_lora_checkpoint_meta(path)
            return Source(path, "lora", cfg, meta)
        if meta.get("kind") != TRAINING_CHECKPOINT or "model_config" not in meta:
            raise CheckpointError(f"{path}: not a training checkpoint (kind "
                                  f"{meta.get('kind')!r})")
        try:
            cfg = ModelConfig.from_dict(meta["model_config"])
        except (ConfigError, TypeError) as e:
            raise CheckpointError(f"{path}: bad model config ({e})") from None
        return Source(path, "checkpoint", cfg, meta)
    if kind == "checkpoint":
        raise CheckpointError(f"{path}: not an anecy checkpoint (for a llama2.c .bin or an HF "
                              "directory, use --init-from)")
    from .llama2c import read_config
    cfg, _ = read_config(path)
    return Source(path, "llama2c", cfg)


def _is_anecy_checkpoint(path: Path) -> bool:
    from .checkpoint import MAGIC
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError as e:
        raise cannot_read(path, e, kind=CheckpointError) from None


def load(source: Source, seq_len: Optional[int] = None, backend: str = "cpu") -> Model:
    """A Model holding the source's weights. ``seq_len`` (default: the source's context,
    at most 256) sizes the training engine's buffers only: decoding has its own cache."""
    cfg = ModelConfig.from_dict(source.config.to_dict())
    cfg.seq_len = seq_len or min(cfg.seq_len, 256)
    cfg.validate()
    model = Model(cfg, backend=backend)
    active = load_into(model, source)
    if active is not None and active.size < cfg.vocab_size:
        # trained with vocabulary compaction: only these tokens were ever scored
        model.set_active_vocab(active.astype(np.int64))
    return model


def load_into(model: Model, source):
    """Copy a source's weights (a Source, or a path: a directory is HF, a file llama2.c or
    an anecy checkpoint) into a Model of the same shape (sequence lengths may differ).
    Returns a training checkpoint's active vocabulary (None for other sources); the Model's
    own active vocabulary is left alone."""
    if not isinstance(source, Source):
        source = inspect(source)
    if source.kind == "lora":
        return _load_lora_into(model, source)
    if source.kind == "hf":
        from .hf import load_into as hf_load_into
        hf_load_into(model, source.path)
    elif source.kind == "llama2c":
        from .llama2c import load_into as llama2c_load_into
        llama2c_load_into(model, source.path)
    else:
        # every field but the training window: rope_style and the rest say how the
        # checkpoint's own layout is to be read
        model.config.require_same(source.config, source.path,
                                  [f for f in source.config.to_dict() if f != "seq_len"])
        # staged: a checkpoint refused half-way (checksum, NaN) leaves the model as it was
        staged = np.empty_like(model.params)
        # only the weights (and the vocabulary) are kept: the Adam moments are
        # checksummed as they stream past, never held
        _, arrays = load_checkpoint(source.path, into={"params": staged},
                                    only=("active_ids",))
        if not all(np.isfinite(staged[i:i + (1 << 22)]).all()
                   for i in range(0, staged.size, 1 << 22)):
            raise CheckpointError(f"{source.path}: holds NaN or infinite weights")
        model.params[...] = staged
        model.weights_changed()
        return arrays.get("active_ids")
    return None


def base_of(source: Source) -> Source:
    """The base model a LoRA checkpoint adapts (the Source its meta names)."""
    path = source.meta["base"]["path"]
    if not Path(path).exists():
        raise CheckpointError(f"{source.path}: its base model {path} is gone")
    return inspect(path, "init")


def _load_lora_into(model: Model, source: Source):
    """A LoRA checkpoint's base with its adapters fused, into ``model``. The base is loaded
    and checked (its content hash must be the checkpoint's) in a Model of its own first, so
    that a refused one leaves ``model`` as it was."""
    from .lora import base_hash, fuse, load_lora_checkpoint
    _, adapters, arrays = load_lora_checkpoint(source.path)
    base = load(base_of(source), seq_len=model.config.seq_len)
    if base_hash(base) != source.meta["base"]["hash"]:
        raise CheckpointError(f"{source.path}: its base {source.meta['base']['path']} has "
                              "changed since the adapters were trained (content hash differs)")
    fuse(base, adapters, inplace=True)
    theirs, ours = base.config, model.config
    diff = [f for f, v in theirs.to_dict().items() if f != "seq_len" and getattr(ours, f) != v]
    if diff:
        raise CheckpointError(f"{source.path} holds another model (differs in "
                              f"{', '.join(diff)})")
    model.params[...] = base.params
    model.weights_changed()
    return arrays.get("active_ids")


# -- tokenizers ----------------------------------------------------------------------------
def tokenizer_for_data(data: Optional[str]):
    """The tokenizer a token file was prepared with (its sidecar), the built-in decoder for
    the built-in corpus, or None when nothing says."""
    from . import tokenizer
    if data == BUILTIN_DATA:
        return tokenizer.builtin()
    if not data or not Path(data).is_file():
        return None
    from .data import read_sidecar
    side = read_sidecar(data)
    if not side:
        return None
    path = side["tokenizer"].get("path")
    if not path:
        return None
    if not Path(path).exists():
        raise AnecyError(f"the tokenizer {path} that {data} was prepared with is gone; name "
                         "one with --tokenizer")
    return tokenizer.load(path)


def tokenizer_for(source: Source, given=None):
    """The tokenizer to read and write a source's text: ``given`` (a path), else for a
    checkpoint the --tokenizer it was trained with or the one its data was prepared with
    (the data path as recorded, or beside the checkpoint), else the one in an HF directory;
    None when unknown."""
    from . import tokenizer
    if given:
        return tokenizer.load(given)
    if source.kind in ("checkpoint", "lora"):
        named = (source.meta.get("train_config") or {}).get("tokenizer")
        if named and Path(named).exists():
            return tokenizer.load(named)
        data = source.meta.get("data")
        if data and data != BUILTIN_DATA and not Path(data).is_file() \
                and (source.path.parent / data).is_file():
            data = str(source.path.parent / data)
        found = tokenizer_for_data(data)
        if found is None and source.kind == "lora" and Path(source.meta["base"]["path"]).exists():
            return tokenizer_for(base_of(source))   # the base's own (an HF directory's)
        return found
    names = ("tokenizer.json", "tokenizer.model")
    if source.kind == "hf" and any((source.path / n).is_file() for n in names):
        return tokenizer.load(source.path)
    return None
