"""``anecy download tinystories``: TinyStories and the Llama-2 tokenizer from the Hugging
Face hub, prepared into the token files the trainer reads.

What is fetched (every repository and file name can be overridden):
- the raw stories of the ``roneneldan/TinyStories`` dataset: ``TinyStories-train.txt`` and
  ``TinyStories-valid.txt``, plain text with the stories separated by ``<|endoftext|>``;
- Llama 2's SentencePiece ``tokenizer.model`` from ``hf-internal-testing/llama-tokenizer``,
  an ungated model repository that carries it (Meta's own repositories are gated). It is
  checked to give Llama 2's ids before anything is tokenized with it.

Downloads go through ``huggingface_hub`` (its cache, resuming a dropped connection, progress
bars); a file already in the output directory is used as it is, which is also the way to
work offline. The training text is cut at story boundaries into ``SHARDS`` parts of about
equal size, as llama2.c's pretokenized TinyStories is, and the first ``shards`` of them are
tokenized into ``tinystories_data00.bin``, ``tinystories_data01.bin``, ... (BOS before each
story, uint16); the validation stories into ``tinystories_val.bin``, which every shard's
sidecar names as its held-out file, so training evaluates on TinyStories' own validation
split.
"""

import shutil
from pathlib import Path

from .errors import AnecyError

# The tokenizers, token files and the preparing are imported inside the functions that use
# them: `anecy download --help` reads the names below and loads no more.

DATASET_REPO = "roneneldan/TinyStories"
TRAIN_FILE = "TinyStories-train.txt"
VALID_FILE = "TinyStories-valid.txt"
TOKENIZER_REPO = "hf-internal-testing/llama-tokenizer"
TOKENIZER_FILE = "tokenizer.model"
SEPARATOR = "<|endoftext|>"
SHARDS = 50
# Llama 2's ids for a fixed text: a tokenizer that does not give them is another one
LLAMA2_PROBE = ("Once upon a time, there was a little girl named Lily.",
                [9038, 2501, 263, 931, 29892, 727, 471, 263, 2217, 7826, 4257, 365, 2354, 29889])
HUB_EXTRA = 'pip install "anecy[data]"'


def shard_name(k: int) -> str:
    return f"tinystories_data{k:02d}.bin"


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise AnecyError(f"downloading needs the Python package 'huggingface_hub': run "
                         f"`{HUB_EXTRA}`") from None
    return huggingface_hub


def _reason(e) -> str:
    """Why a hub download failed, in a few words."""
    names = {c.__name__ for c in type(e).__mro__}
    if "GatedRepoError" in names:
        return "the repository is gated (it needs an accepted licence and a login)"
    if "RepositoryNotFoundError" in names:
        return "no such repository (or it is private)"
    if "RevisionNotFoundError" in names:
        return "no such revision"
    if "EntryNotFoundError" in names and "LocalEntryNotFoundError" not in names:
        return "no such file in the repository"
    if "OfflineModeIsEnabled" in names or "LocalEntryNotFoundError" in names:
        return "offline or the hub is unreachable, and the file is not in the cache"
    text = " ".join(str(e).split())
    return text[:200] or type(e).__name__


def fetch(repo_id: str, filename: str, repo_type: str, directory: Path,
          progress: bool = True, log=print) -> Path:
    """``directory/filename`` if it is there, else the file from the hub (through the
    cache). Failing, one line saying what to fetch and where to put it."""
    local = directory / filename
    if local.is_file():
        return local
    hub = _hub()
    from huggingface_hub.utils import disable_progress_bars, logging
    # the client retries a failing connection for some 20 s, warning each time; the one line
    # anecy prints when it gives up says all that is needed
    logging.set_verbosity_error()
    if not progress:
        disable_progress_bars()
    url = hub.hf_hub_url(repo_id, filename, repo_type=repo_type)
    log(f"{filename}: from the Hugging Face hub ({repo_type} {repo_id}) or its cache")
    try:
        return Path(hub.hf_hub_download(repo_id, filename, repo_type=repo_type))
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - network and hub errors come in many types
        raise AnecyError(f"cannot fetch {filename} from the Hugging Face hub ({_reason(e)}): "
                         f"download {url} and put it in {directory}/, or run again "
                         "online") from None


def check_llama2(path):
    """The Llama 2 tokenizer at ``path`` (a Tokenizer), checked on a probe sentence."""
    from . import tokenizer as tokenizers
    tok = tokenizers.load(path)
    text, ids = LLAMA2_PROBE
    if tok.vocab_size != 32000 or tok.encode(text) != ids:
        raise AnecyError(f"{path}: not the Llama 2 tokenizer (vocabulary {tok.vocab_size}, "
                         "or other ids for a test sentence); name another with "
                         "--tokenizer-repo/--tokenizer-file, or put Llama 2's tokenizer.model "
                         "in the output directory")
    return tok


def shard_bounds(path: Path, n_shards: int, separator: bytes, upto: int) -> list:
    """Byte offsets of the first ``upto`` + 1 boundaries when ``path`` is cut into
    ``n_shards`` parts of about equal size, each cut just after a separator."""
    size = path.stat().st_size
    bounds = [0]
    with open(path, "rb") as f:
        for k in range(1, upto + 1):
            if k == n_shards:
                bounds.append(size)
                break
            pos = max(k * size // n_shards, bounds[-1])
            f.seek(pos)
            tail = b""
            while True:
                block = f.read(1 << 20)
                if not block:
                    found = size
                    break
                buf = tail + block
                i = buf.find(separator)
                if i >= 0:
                    found = pos - len(tail) + i + len(separator)
                    break
                tail = buf[-(len(separator) - 1):]
                pos += len(block)
            bounds.append(found)
    return bounds


def _copy_range(src: Path, dst: Path, start: int, end: int):
    with open(src, "rb") as f, open(dst, "wb") as out:
        f.seek(start)
        left = end - start
        while left:
            block = f.read(min(left, 1 << 22))
            if not block:
                break
            out.write(block)
            left -= len(block)


def _already_prepared(path: Path) -> bool:
    from .data import open_tokens, read_sidecar
    try:
        meta = read_sidecar(path)
        return meta is not None and open_tokens(path, meta["vocab_size"], 0) is not None
    except AnecyError:
        return False


def tinystories(directory=".", shards=1, repo=DATASET_REPO, train_file=TRAIN_FILE,
                valid_file=VALID_FILE, tokenizer_repo=TOKENIZER_REPO,
                tokenizer_file=TOKENIZER_FILE, force=False, workers=None, progress=True,
                log=print) -> list:
    """Fetch TinyStories and the Llama-2 tokenizer and prepare the first ``shards`` of
    ``SHARDS`` training shards and the validation file in ``directory``; returns the paths
    of the training shards."""
    from .data import read_sidecar
    from .fileio import check_writable
    from .prepare import prepare, write_sidecar
    if not 1 <= shards <= SHARDS:
        raise AnecyError(f"--shards must be between 1 and {SHARDS}, got {shards}")
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AnecyError(f"{directory}: cannot create the directory ({e.strerror or e})") \
            from None
    outputs = [directory / shard_name(k) for k in range(shards)]
    val_out = directory / "tinystories_val.bin"
    for p in outputs + [val_out, directory / TOKENIZER_FILE]:
        check_writable(p)

    tok_src = fetch(tokenizer_repo, tokenizer_file, "model", directory, progress, log)
    check_llama2(tok_src)
    tok_path = directory / TOKENIZER_FILE   # kept beside the data, for sampling later
    if tok_src.resolve() != tok_path.resolve():
        shutil.copyfile(tok_src, tok_path)
    valid = fetch(repo, valid_file, "dataset", directory, progress, log)
    train = fetch(repo, train_file, "dataset", directory, progress, log)

    sep = SEPARATOR.encode()
    if force or not _already_prepared(val_out):
        prepare([valid], tok_path, val_out, separator=SEPARATOR, workers=workers,
                progress=progress, log=log)
    val_meta = read_sidecar(val_out)
    bounds = shard_bounds(train, SHARDS, sep, shards)
    for k, out in enumerate(outputs):
        if not force and _already_prepared(out):
            log(f"{out}: already prepared")
            continue
        if bounds[k + 1] <= bounds[k]:
            raise AnecyError(f"{train}: too little text for shard {k} of {SHARDS}")
        part = directory / f".{shard_name(k)}.txt"
        try:
            _copy_range(train, part, bounds[k], bounds[k + 1])
            meta = prepare([part], tok_path, out, separator=SEPARATOR, workers=workers,
                           progress=progress, log=log)
        finally:
            part.unlink(missing_ok=True)
        meta["sources"] = [str(train.resolve())]
        meta["shard"] = {"index": k, "of": SHARDS, "bytes": [bounds[k], bounds[k + 1]]}
        meta["val"] = {"path": val_out.name, "documents": val_meta["documents"],
                       "tokens": val_meta["tokens"], "source": str(valid.resolve())}
        write_sidecar(out, meta)
    return outputs
