"""GGUF files, the format llama.cpp (and Ollama, LM Studio, ...) runs: write a Model and its
tokenizer as one, with the ``gguf`` package (llama.cpp's own Python writer and quantizers).

A model without QK-norm is written as llama.cpp's architecture ``llama``, whose RoPE rotates
adjacent pairs (2i, 2i+1): q and k rows go in that, the interleaved, order (what llama.cpp's
converter makes of HF's half-split rows), whatever the Model's own ``rope_style``. A model
with QK-norm is ``qwen3``, whose RoPE rotates (i, i + head_dim/2): q, k and their norm weights
go in HF's order. Tensor names come from the ``gguf`` package's own map of HF names.

The tokenizer goes in the file: a SentencePiece ``.model`` or llama2.c ``tokenizer.bin`` as
tokenizer model ``llama`` (pieces, scores, token types), an HF byte-level BPE
``tokenizer.json`` as ``gpt2`` (tokens, types, merges and the pre-tokenizer's name), each with
BOS/EOS and, when the tokenizer's directory has one (tokenizer_config.json), the chat
template. Tensors are f32, f16 or q8_0; norm weights (1-D) always stay f32, and with q8_0 a
matrix whose rows are not a multiple of 32 values is f16, as llama.cpp's converter does it.
"""

import json
from pathlib import Path

import numpy as np

from .errors import AnecyError, ConfigError, OutputError
from .fileio import atomic_path
from .model import Model

DTYPES = ("f32", "f16", "q8_0")
EXTRA = 'pip install "anecy[gguf]"'
# Byte-level BPE pre-tokenizer regexes (tokenizer.json's Split pattern) -> the name llama.cpp
# gives that pre-tokenizer (tokenizer.ggml.pre).
_PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
    r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
}
_GPT2_PRE = "gpt-2"   # ByteLevel's own regex (use_regex), GPT-2's


def _gguf():
    try:
        import gguf
    except ImportError:
        raise AnecyError(f"GGUF export needs the Python package 'gguf': run `{EXTRA}`") from None
    return gguf


def architecture(cfg) -> str:
    """llama.cpp's architecture for a ModelConfig: qwen3 with QK-norm, else llama."""
    return "qwen3" if cfg.qk_norm else "llama"


def check_exportable(cfg):
    """Raise ConfigError unless llama.cpp's llama/qwen3 architectures can run this model (and
    AnecyError when the gguf package is missing)."""
    _gguf()
    if cfg.residual_scale != 1.0:
        raise ConfigError("GGUF models have no residual scale; this model uses "
                          f"residual_scale={cfg.residual_scale:g}")


# -- tensors ---------------------------------------------------------------------------------
def _tensors(model: Model, arch: str) -> dict:
    """{HF name: array} with q/k rows in the order llama.cpp's ``arch`` rotates."""
    if arch == "llama":
        from .llama2c import _interleaved_views  # llama.cpp's llama pairs rows as llama2.c
        return _interleaved_views(model)
    if model.config.rope_style == "half":
        return model.views
    return model.hf_state_dict()


def _qtype(gguf, shape, dtype: str):
    """The GGML type of a tensor of ``shape`` in an export at ``dtype``: 1-D tensors (norm
    weights) stay f32; with q8_0, matrices whose rows are not whole blocks are f16."""
    Q = gguf.GGMLQuantizationType
    if len(shape) == 1 or dtype == "f32":
        return Q.F32
    if dtype == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return Q.Q8_0
    return Q.F16


# -- tokenizers ------------------------------------------------------------------------------
def check_tokenizer(tok, vocab_size):
    """Raise AnecyError unless ``tok`` can go in a GGUF file with a model of ``vocab_size``
    rows."""
    if tok is None:
        raise AnecyError("a GGUF file holds its tokenizer, and none is known for this model: "
                         "name one with --tokenizer")
    if tok.kind == "builtin":
        raise AnecyError("the built-in corpus has no tokenizer to put in a GGUF file: name "
                         "Llama 2's tokenizer.model with --tokenizer")
    if tok.vocab_size > vocab_size:
        raise AnecyError(f"tokenizer {tok.path} has {tok.vocab_size} tokens, more than the "
                         f"model's vocabulary of {vocab_size}: is it this model's tokenizer?")


def _padded(tokens, scores, types, vocab_size, gguf):
    """The vocabulary filled up to the model's rows (a model may have more rows than its
    tokenizer has tokens, Qwen3 does): unused [PAD<id>] tokens, as llama.cpp's converter."""
    if len(tokens) > vocab_size:   # ids beyond the model's rows (a tokenizer with gaps)
        raise AnecyError(f"the tokenizer's ids reach {len(tokens) - 1}, beyond the model's "
                         f"vocabulary of {vocab_size}: is it this model's tokenizer?")
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    return tokens, scores, types


def _sentencepiece_vocab(tok, gguf):
    T, sp = gguf.TokenType, tok.sp
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        types.append(T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i)
                     else T.UNUSED if sp.is_unused(i) else T.BYTE if sp.is_byte(i)
                     else T.NORMAL)
    return tokens, scores, types


# llama2.c's tokenizer.bin keeps SentencePiece's pieces with "▁" written as a space, and BOS/EOS
# as "\n<s>\n" / "\n</s>\n"
_LLAMA2C_CONTROL = {b"\n<s>\n": "<s>", b"\n</s>\n": "</s>"}


def _llama2c_vocab(tok, gguf):
    T = gguf.TokenType
    tokens, types = [], []
    for i, piece in enumerate(tok.pieces):
        if i in tok.control:
            tokens.append(_LLAMA2C_CONTROL.get(piece) or piece.decode("utf-8", "replace"))
            types.append(T.CONTROL)
            continue
        tokens.append(piece.decode("utf-8", "replace").replace(" ", "\u2581"))
        types.append(T.BYTE if i in tok.byte_value else T.UNKNOWN if i == tok.unk_id
                     else T.NORMAL)
    return tokens, [float(s) for s in tok.scores], types


def _pre_tokenizer(spec: dict, path) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer.json's pre-tokenizer, or an error."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    if not byte_level:
        raise AnecyError(f"{path}: not a byte-level BPE tokenizer (GGUF's gpt2 tokenizer "
                         "model); for a SentencePiece model give its tokenizer.model with "
                         "--tokenizer")
    splits = [p for p in parts if p.get("type") == "Split"]
    if not splits and byte_level[0].get("use_regex", True):
        return _GPT2_PRE
    regex = [(p.get("pattern") or {}).get("Regex") for p in splits]
    if len(regex) == 1 and regex[0] in _PRE_TOKENIZERS:
        return _PRE_TOKENIZERS[regex[0]]
    raise AnecyError(f"{path}: its pre-tokenizer is not one llama.cpp knows by name (Qwen2's, "
                     "Llama 3's or GPT-2's); llama.cpp would split text differently")


def _hf_vocab(tok, gguf):
    """(tokens, types, pre-tokenizer name, merges) of a byte-level BPE tokenizer.json."""
    T = gguf.TokenType
    try:
        spec = json.loads(Path(tok.path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AnecyError(f"{tok.path}: unreadable ({e})") from None
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise AnecyError(f"{tok.path}: a {model.get('type')} tokenizer; GGUF export takes "
                         "byte-level BPE tokenizer.json files or SentencePiece models")
    pre = _pre_tokenizer(spec, tok.path)
    merges = model.get("merges") or []
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    if not merges:
        raise AnecyError(f"{tok.path}: a BPE tokenizer without merges")
    by_id = {i: t for t, i in tok.tok.get_vocab(with_added_tokens=True).items()}
    added = tok.tok.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(max(by_id) + 1 if by_id else 0):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(T.CONTROL if added[i].special else T.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(T.NORMAL)
    return tokens, types, pre, merges


def _adds_bos(tok) -> bool:
    """Whether the HF tokenizer's own post-processor starts a text with BOS."""
    if tok.bos_id is None:
        return False
    ids = tok.tok.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == tok.bos_id


def _add_tokenizer(writer, tok, vocab_size, gguf):
    """Write the tokenizer's keys (tokenizer.ggml.*, tokenizer.chat_template)."""
    check_tokenizer(tok, vocab_size)
    # llama.cpp's reader of a tokenizer's directory: special ids (unk, pad, ...), whether BOS
    # is added, the chat template
    directory = Path(tok.path).parent
    try:
        special = gguf.SpecialVocab(directory, load_merges=False, n_vocab=vocab_size)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise AnecyError(f"{directory}: unreadable tokenizer_config.json or config.json "
                         f"({e})") from None
    if tok.kind == "hf":
        tokens, types, pre, merges = _hf_vocab(tok, gguf)
        tokens, _, types = _padded(tokens, [0.0] * len(tokens), types, vocab_size, gguf)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        special.add_special_token.setdefault("bos", _adds_bos(tok))
    else:
        vocab = _sentencepiece_vocab if tok.kind == "sentencepiece" else _llama2c_vocab
        tokens, scores, types = _padded(*vocab(tok, gguf), vocab_size, gguf)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special.add_special_token.setdefault("bos", tok.bos_id is not None)
        unk = [i for i, t in enumerate(types) if t == gguf.TokenType.UNKNOWN]
        if unk:
            special.special_token_ids.setdefault("unk", unk[0])
    for which in ("bos", "eos"):
        # anecy's BOS/EOS when it has them; else what llama.cpp's converter finds (Qwen3's
        # tokenizer has no BOS, its config.json names <|endoftext|>; without a key llama.cpp
        # takes id 11 for a gpt2 vocabulary, "," in Qwen's)
        if getattr(tok, f"{which}_id") is not None:
            special.special_token_ids[which] = getattr(tok, f"{which}_id")
    special.add_special_token.setdefault("eos", False)
    special.add_to_gguf(writer, quiet=True)


# -- the file ---------------------------------------------------------------------------------
def _add_shape(writer, cfg, context_length: int):
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(context_length)
    writer.add_embedding_length(cfg.dim)
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)


def _write_tensors(writer, model: Model, arch: str, dtype: str, gguf, progress: bool):
    """The header, the keys added so far, the tensor infos, then the tensors one at a time
    (only one converted tensor is ever held in memory)."""
    from tqdm import tqdm
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()),
                                     model.config.n_layers)
    plan = []
    for hf_name, shape, _ in model.layout:
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
        if gguf_name is None:   # cannot happen for the layouts anecy makes
            raise ConfigError(f"{hf_name}: no GGUF name for {arch}")
        qtype = _qtype(gguf, shape, dtype)
        byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
        writer.add_tensor_info(gguf_name, byte_shape, np.dtype(np.uint8),
                               int(np.prod(byte_shape)), raw_dtype=qtype)
        plan.append((hf_name, qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    tensors = _tensors(model, arch)
    for hf_name, qtype in tqdm(plan, desc="writing GGUF", unit="tensor", disable=not progress,
                               dynamic_ncols=True):
        writer.write_tensor_data(gguf.quants.quantize(
            np.ascontiguousarray(tensors[hf_name], np.float32), qtype))


def save(model: Model, path, tokenizer, *, dtype: str = "f32", context_length=None,
         name: str = "anecy model", progress: bool = False):
    """Write a Model and its tokenizer as a GGUF file, atomically. ``context_length`` is the
    context the model was made for (default: the Model's seq_len)."""
    gguf = _gguf()
    if dtype not in DTYPES:
        raise ConfigError(f"GGUF dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    cfg = model.config
    check_exportable(cfg)
    check_tokenizer(tokenizer, cfg.vocab_size)
    arch = architecture(cfg)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            writer = gguf.GGUFWriter(tmp, arch)
            try:
                writer.add_name(name)
                writer.add_file_type(file_type)
                if dtype == "q8_0":
                    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
                _add_shape(writer, cfg, int(context_length or cfg.seq_len))
                _add_tokenizer(writer, tokenizer, cfg.vocab_size, gguf)
                _write_tensors(writer, model, arch, dtype, gguf, progress)
            finally:
                writer.close()
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    return path
