"""anecy prepare: text and JSONL to token files, checked against the tokenizers themselves."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anecy.config import ModelConfig, TrainConfig
from anecy.corpus import builtin_stories
from anecy.data import open_tokens, read_sidecar
from anecy.errors import AnecyError
from anecy.prepare import documents, prepare, val_path_for
from conftest import IN_CI, require_module, require_shared

ROOT = Path(__file__).resolve().parents[1]
WHY = "the Llama-2 tokenizer, to prepare text as llama2.c does"


def llama2_model():
    require_module("sentencepiece", "pip install sentencepiece", WHY)
    return require_shared("data", "llama2-tokenizer", "tokenizer.model", why=WHY)


def run_anecy(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "anecy", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def one_line_error(r, *needles):
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def stories(n, seed=0):
    # TinyStories-like documents with line breaks inside (but no blank lines)
    return [s.replace("\n\n", "\n") for s in builtin_stories(n, seed)]


@pytest.fixture
def corpus(tmp_path):
    """A plain-text file and a JSONL file, and their documents in order."""
    text_docs, json_docs = stories(40), stories(25, seed=1) + ["naïve café 你好 🙂 <s> x"]
    (tmp_path / "a.txt").write_text("\n\n\n".join(text_docs) + "\n", encoding="utf-8")
    with open(tmp_path / "b.jsonl", "w", encoding="utf-8") as f:
        for d in json_docs:
            f.write(json.dumps({"text": "  " + d + "\n", "meta": 1}) + "\n\n")
    return tmp_path / "a.txt", tmp_path / "b.jsonl", text_docs + json_docs


def test_prepare_encodes_like_llama2c_pretokenize(tmp_path, corpus):
    # BOS, then the SentencePiece ids of the stripped document; no EOS
    spm = require_module("sentencepiece", "pip install sentencepiece", WHY)
    model = llama2_model()
    sp = spm.SentencePieceProcessor(model_file=str(model))
    a, b, docs = corpus
    out = tmp_path / "tokens.bin"
    meta = prepare([a, b], model, out, workers=1, progress=False, log=lambda *_: None)
    want = [i for d in docs for i in [1] + sp.encode(d.strip())]
    assert np.fromfile(out, dtype="<u2").tolist() == want
    assert meta == read_sidecar(out)
    assert meta["tokenizer"] == {"kind": "sentencepiece", "path": str(model.resolve())}
    assert (meta["vocab_size"], meta["dtype"], meta["separator"]) == (32000, "uint16", "bos")
    assert (meta["documents"], meta["tokens"], meta["split"]) == (len(docs), len(want), "all")
    assert "val" not in meta
    # llama2.c's tokenizer.bin gives the same file, and so does any number of workers
    binary = require_shared("data", "llama2-tokenizer", "tokenizer.bin", why=WHY)
    prepare([a, b], binary, tmp_path / "t2.bin", workers=2, progress=False,
            log=lambda *_: None)
    assert (tmp_path / "t2.bin").read_bytes() == out.read_bytes()
    assert read_sidecar(tmp_path / "t2.bin")["tokenizer"]["kind"] == "llama2c"


def test_val_frac_holds_out_evenly_spread_documents(tmp_path, corpus):
    model = llama2_model()
    a, b, docs = corpus
    out = tmp_path / "tokens.bin"
    prepare([a, b], model, tmp_path / "all.bin", workers=1, progress=False,
            log=lambda *_: None)
    meta = prepare([a, b], model, out, val_frac=0.1, workers=2, progress=False,
                   log=lambda *_: None)
    val = tmp_path / "tokens.val.bin"
    assert val_path_for(out) == val
    whole = np.fromfile(tmp_path / "all.bin", dtype="<u2")
    starts = list(np.flatnonzero(whole == 1)) + [len(whole)]
    per_doc = [whole[s:e] for s, e in zip(starts, starts[1:])]
    held = [i for i in range(len(docs)) if int((i + 1) * 0.1) > int(i * 0.1)]
    assert held == [9, 19, 29, 39, 49, 59]
    want_val = np.concatenate([per_doc[i] for i in held])
    want_train = np.concatenate([d for i, d in enumerate(per_doc) if i not in held])
    assert np.array_equal(np.fromfile(val, dtype="<u2"), want_val)
    assert np.array_equal(np.fromfile(out, dtype="<u2"), want_train)
    assert meta["split"] == "train" and meta["documents"] == len(docs) - len(held)
    assert meta["val"] == {"path": "tokens.val.bin", "fraction": 0.1,
                           "documents": len(held), "tokens": len(want_val)}
    vmeta = read_sidecar(val)
    assert (vmeta["split"], vmeta["train"], vmeta["tokens"]) == ("val", "tokens.bin",
                                                                 len(want_val))


def test_trainer_evaluates_on_the_held_out_file(tmp_path, corpus):
    from anecy.trainer import Trainer
    model = llama2_model()
    a, b, _ = corpus
    out = tmp_path / "tokens.bin"
    prepare([a, b], model, out, val_frac=0.2, workers=1, progress=False, log=lambda *_: None)
    tc = TrainConfig(steps=2, data_path=str(out), eval_every=2, ckpt_path=None)
    t = Trainer(ModelConfig.preset("tiny"), tc, log=lambda *_: None)
    val = np.fromfile(tmp_path / "tokens.val.bin", dtype="<u2")
    assert t.sampler.n_train == len(t.tokens)          # all of tokens.bin trains
    x, y = t.sampler.val_batches(1)[0]
    assert np.array_equal(x, val[:64]) and np.array_equal(y, val[1:65])
    # ids only in the held-out file are in the compacted vocabulary too
    assert set(np.unique(val)) <= set(t.vocab.active_ids.tolist())
    t.run(progress=False)
    assert t.last_val_loss is not None and np.isfinite(t.last_val_loss)


def _word_level(tmp_path, n_words):
    """A word-level HF tokenizer.json of n_words words ("w0".."w{n-1}") and <s>, </s>."""
    require_module("tokenizers", "pip install tokenizers", "an HF tokenizer for prepare")
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {f"w{i}": i for i in range(n_words)}
    vocab.update({"<unk>": n_words, "<s>": n_words + 1, "</s>": n_words + 2})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<s>", "</s>"])
    d = tmp_path / "tok"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    return d


def test_large_vocabulary_writes_uint32(tmp_path):
    tok_dir = _word_level(tmp_path, 70000)
    (tmp_path / "in.txt").write_text("w69999 w3\nw65536\n\nw0 w1\n")
    out = tmp_path / "t.bin"
    meta = prepare([tmp_path / "in.txt"], tok_dir, out, workers=1, progress=False,
                   log=lambda *_: None)
    assert (meta["dtype"], meta["vocab_size"], meta["tokenizer"]["kind"]) == (
        "uint32", 70003, "hf")
    assert np.fromfile(out, dtype="<u4").tolist() == [70001, 69999, 3, 65536, 70001, 0, 1]
    # the trainer's reader takes the dtype from the sidecar
    assert open_tokens(out, 151936, 4).tolist() == [70001, 69999, 3, 65536, 70001, 0, 1]


def test_no_bos_ends_documents_with_eos(tmp_path):
    # Qwen3's tokenizer has no BOS: documents are separated by EOS instead
    tok_dir = _word_level(tmp_path, 100)
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": None,
                                                               "eos_token": "</s>"}))
    (tmp_path / "in.txt").write_text("w1 w2\n\nw3\n")
    meta = prepare([tmp_path / "in.txt"], tok_dir, tmp_path / "t.bin", workers=1,
                   progress=False, log=lambda *_: None)
    assert meta["separator"] == "eos" and meta["bos_id"] is None
    assert np.fromfile(tmp_path / "t.bin", dtype="<u2").tolist() == [1, 2, 102, 3, 102]


def test_documents_split_at_a_separator(tmp_path):
    p = tmp_path / "ts.txt"
    p.write_text("One story.\n\nIts second paragraph.\n<|endoftext|>\nTwo<|endoftext|>"
                 "Three\n<|endoftext|>\n\n")
    assert [t for t, _ in documents([p], "<|endoftext|>") if t] == [
        "One story.\n\nIts second paragraph.", "Two", "Three"]
    assert [t for t, _ in documents([p]) if t] == [
        "One story.", "Its second paragraph.\n<|endoftext|>\nTwo<|endoftext|>Three\n"
        "<|endoftext|>"]
    # the byte counts add up to the file, for the progress bar
    assert sum(n for _, n in documents([p], "<|endoftext|>")) == p.stat().st_size


def test_jsonl_detected_by_content(tmp_path):
    p = tmp_path / "data.txt"
    p.write_text('\n{"text": "a b"}\n{"text": "c"}\n')
    assert [t for t, _ in documents([p])] == ["a b", "c"]
    j = tmp_path / "array.json"
    j.write_text('[{"text": "a"}]')
    with pytest.raises(AnecyError, match="array.json: a .json file that is not JSON lines"):
        list(documents([j]))
    j.write_text('{"text": "a"}\n')
    assert [t for t, _ in documents([j])] == ["a"]
    q = tmp_path / "braces.txt"
    q.write_text("{not json}\n\nsecond\n")
    assert [t for t, _ in documents([q])] == ["{not json}", "second"]


# -- bad input: one line, status 2, nothing written ---------------------------------------------

def test_bad_inputs_fail_with_one_line(tmp_path):
    model = llama2_model()
    good = tmp_path / "good.txt"
    good.write_text("Once upon a time.\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": broken}\n')
    out = tmp_path / "t.bin"

    r = run_anecy("prepare", tmp_path / "missing.txt", "--tokenizer", model, "--out", out)
    one_line_error(r, "missing.txt: no such file")
    r = run_anecy("prepare", good, bad, "--tokenizer", model, "--out", out, "--no-progress")
    one_line_error(r, "bad.jsonl:3:", "not a JSON line")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.txt"]
    bad.write_text('{"text": "a"}\n{"txt": "b"}\n')
    one_line_error(run_anecy("prepare", bad, "--tokenizer", model, "--out", out,
                             "--no-progress"), 'bad.jsonl:2: a JSON line needs a "text" field')
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n\n")
    one_line_error(run_anecy("prepare", empty, "--tokenizer", model, "--out", out,
                             "--no-progress"), "no documents in", "empty.txt")
    one_line_error(run_anecy("prepare", good, "--tokenizer", tmp_path / "nope.model",
                             "--out", out), "nope.model: no such tokenizer file")
    one_line_error(run_anecy("prepare", good, "--tokenizer", model, "--out", out,
                             "--val-frac", "1.5"), "--val-frac must be in [0, 1)")
    one_line_error(run_anecy("prepare", good, "--tokenizer", model, "--out", out,
                             "--val-frac", "0.1", "--no-progress"), "holds out none")
    (tmp_path / "latin1.txt").write_bytes(b"ok\n\ncaf\xe9\n")
    one_line_error(run_anecy("prepare", tmp_path / "latin1.txt", "--tokenizer", model,
                             "--out", out, "--no-progress"), "latin1.txt:3: not UTF-8")
    assert not out.exists() and not list(tmp_path.glob("*.tmp-*"))


def test_unwritable_output_fails_before_the_work(tmp_path):
    # checked before the tokenizer is even loaded: a tokenizer that does not exist is not
    # what the error is about
    good = tmp_path / "good.txt"
    good.write_text("Once upon a time.\n")
    r = run_anecy("prepare", good, "--tokenizer", tmp_path / "nope.model",
                  "--out", tmp_path / "no-such-dir" / "t.bin")
    one_line_error(r, "no-such-dir", "no directory")
    r = run_anecy("prepare", good, "--tokenizer", tmp_path / "nope.model", "--out", tmp_path)
    one_line_error(r, "is a directory")
    (tmp_path / "t.val.bin").mkdir()
    r = run_anecy("prepare", good, "--tokenizer", tmp_path / "nope.model",
                  "--out", tmp_path / "t.bin", "--val-frac", "0.5")
    one_line_error(r, "t.val.bin: it is a directory")


def test_prepare_command_end_to_end(tmp_path, corpus):
    model = llama2_model()
    a, b, docs = corpus
    out = tmp_path / "tokens.bin"
    r = run_anecy("prepare", a, b, "--tokenizer", model, "--out", out, "--val-frac", "0.1")
    assert r.returncode == 0, r.stderr
    assert "tokens.bin:" in r.stdout and "tokens.val.bin:" in r.stdout
    assert "prepare" in r.stderr          # the progress bar
    meta = read_sidecar(out)
    assert meta["documents"] + meta["val"]["documents"] == len(docs)
    r = run_anecy("prepare", "--help")
    assert r.returncode == 0 and "--val-frac" in r.stdout


def test_prepare_benchmark_quick():
    tok = llama2_model().parent
    require_shared("data", "llama2-tokenizer", "tokenizer.bin", why=WHY)
    r = subprocess.run([sys.executable, "bench/bench_prepare.py", "--tokenizer", str(tok),
                        "--mb", "0.3", "--repeat", "1"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "the same token file from all: True" in r.stdout and "speedup of" in r.stdout


def test_ctrl_c_leaves_nothing_behind(tmp_path):
    # Ctrl-C reaches the whole process group: the workers leave it to the parent, which
    # stops the pool, removes the temporary and exits with 130 and one line
    import signal
    import time
    binary = require_shared("data", "llama2-tokenizer", "tokenizer.bin", why=WHY)
    (tmp_path / "in.txt").write_text("\n\n".join(stories(4000)))
    out = tmp_path / "t.bin"
    p = subprocess.Popen([sys.executable, "-m", "anecy", "prepare", str(tmp_path / "in.txt"),
                          "--tokenizer", str(binary), "--out", str(out), "--workers", "2",
                          "--no-progress"], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob("t.bin.tmp-*")) and time.time() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, "prepare ended before it could be interrupted"
    time.sleep(0.5)
    os.killpg(p.pid, signal.SIGINT)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 130 and err.strip() == "anecy prepare: interrupted", err
    assert sorted(x.name for x in tmp_path.iterdir()) == ["in.txt"]


_ENCODE = {}   # for the recording encoder below, set before the workers are forked


def _recording_encode(texts):
    """anecy.prepare's chunk encoder, leaving a file named after the process that ran it
    (and taking its time, so that one worker cannot take every chunk before the other
    starts)."""
    import time
    (_ENCODE["dir"] / f"pid-{os.getpid()}").touch()
    time.sleep(0.1)
    return _ENCODE["encode"](texts)


@pytest.mark.skipif(not sys.platform.startswith("linux") and not IN_CI,
                    reason="the workers see the patched function only when forked (Linux)")
def test_documents_are_encoded_by_every_worker(tmp_path, monkeypatch):
    import anecy.prepare as P
    model = llama2_model()
    monkeypatch.setitem(_ENCODE, "dir", tmp_path)
    monkeypatch.setitem(_ENCODE, "encode", P._encode_chunk)
    monkeypatch.setattr(P, "_encode_chunk", _recording_encode)
    (tmp_path / "in.txt").write_text("\n\n".join(stories(3000)))
    prepare([tmp_path / "in.txt"], model, tmp_path / "two.bin", workers=2, progress=False,
            log=lambda *_: None)
    pids = {p.name for p in tmp_path.glob("pid-*")}
    assert len(pids) == 2 and f"pid-{os.getpid()}" not in pids
    for p in tmp_path.glob("pid-*"):
        p.unlink()
    prepare([tmp_path / "in.txt"], model, tmp_path / "one.bin", workers=1, progress=False,
            log=lambda *_: None)
    assert {p.name for p in tmp_path.glob("pid-*")} == {f"pid-{os.getpid()}"}
    assert (tmp_path / "one.bin").read_bytes() == (tmp_path / "two.bin").read_bytes()


# -- inputs read once: pipes, process substitution; BOMs alike ----------------------------------

def test_a_named_pipe_is_read_once_to_its_end(tmp_path):
    # opened twice (to check it, then to read it), a pipe hung, or, with a writer that
    # reopens, gave another document count than was sent
    import threading
    tok_dir = _word_level(tmp_path, 10)
    pipe = tmp_path / "in.txt"
    os.mkfifo(pipe)

    def writer():
        with open(pipe, "w") as f:
            for i in range(400):
                f.write(f"w{i % 10} w1\n\n")

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    meta = prepare([pipe], tok_dir, tmp_path / "t.bin", workers=1, progress=False,
                   log=lambda *_: None)
    t.join(timeout=60)
    assert meta["documents"] == 400 and meta["tokens"] == 1200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "t.bin", "t.bin.json",
                                                          "tok"]


@pytest.mark.skipif(not Path("/dev/fd").is_dir() and not IN_CI,
                    reason="process substitution needs /dev/fd")
def test_process_substitution(tmp_path):
    tok_dir = _word_level(tmp_path, 10)
    script = (f"{sys.executable} -m anecy prepare --no-progress --tokenizer {tok_dir} "
              f"--out {tmp_path / 't.bin'} <(for i in $(seq 250); do printf 'w3 w4\\n\\n'; "
              "done) <(printf '{\"text\": \"w5\"}\\n')")
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr
    ids = np.fromfile(tmp_path / "t.bin", dtype="<u2").tolist()
    assert ids == [11, 3, 4] * 250 + [11, 5]      # 11: <s>; the JSONL one found by content


def test_a_byte_order_mark_is_dropped_in_text_and_jsonl_alike(tmp_path):
    tok_dir = _word_level(tmp_path, 10)
    (tmp_path / "a.txt").write_text("\ufeffw1 w2\n", encoding="utf-8")
    (tmp_path / "a.jsonl").write_text('\ufeff{"text": "w1 w2"}\n', encoding="utf-8")
    (tmp_path / "b.txt").write_text('\ufeff{"text": "w1 w2"}\n', encoding="utf-8")
    for name in ("a.txt", "a.jsonl", "b.txt"):
        prepare([tmp_path / name], tok_dir, tmp_path / f"{name}.bin", workers=1,
                progress=False, log=lambda *_: None)
        assert np.fromfile(tmp_path / f"{name}.bin", dtype="<u2").tolist() == [11, 1, 2], name


def test_workers_are_capped_at_the_cores():
    from anecy.prepare import SMALL_INPUT, available_cores, worker_count
    cores = available_cores()
    # the process's CPU affinity where the system keeps one, else the machine's cores
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count()
    assert cores == expected
    assert worker_count(1000, 10) == cores
    assert worker_count(1, SMALL_INPUT * 10) == 1
    assert worker_count(None, 10) == 1
    assert worker_count(None, SMALL_INPUT) == cores
