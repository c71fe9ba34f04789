"""anecy download tinystories, against a hub served from 127.0.0.1 (never the network)."""
import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from anecy.corpus import builtin_stories
from anecy.data import read_sidecar
from anecy.download import SHARDS, shard_bounds
from conftest import require_module, require_shared

ROOT = Path(__file__).resolve().parents[1]
WHY = "the Llama-2 tokenizer, served by the test's local hub"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def tiny_tinystories(n, seed):
    """TinyStories' text layout: stories separated by <|endoftext|> lines."""
    stories = [s.replace("\n\n", "\n") for s in builtin_stories(n, seed)]
    return stories, "".join(s + "\n<|endoftext|>\n" for s in stories)


class FakeHub:
    """The hub's resolve endpoints for a few files: HEAD with the headers huggingface_hub
    reads (X-Repo-Commit, ETag, Content-Length), GET with Range for resumed downloads."""

    def __init__(self, files):
        self.files = files          # url path -> bytes
        self.requests = []
        self.ranges = []            # the Range header of each request (None without one)
        self.drop = {}              # url path -> bytes to send before dropping the connection
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _serve(self, body_wanted):
                path = re.sub(r"/resolve/[^/]+/", "/resolve/main/", self.path.split("?")[0])
                hub.requests.append((self.command, path))
                hub.ranges.append(self.headers.get("Range"))
                data = hub.files.get(path)
                if data is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                m = re.match(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if m and body_wanted:
                    start = int(m.group(1))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if body_wanted:
                    cut = hub.drop.pop(path, None)   # once: a connection lost mid-file
                    self.wfile.write(data[start:cut])
                    if cut is not None:
                        self.wfile.flush()
                        self.close_connection = True

            def do_HEAD(self):
                self._serve(False)

            def do_GET(self):
                self._serve(True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def gets(self, name):
        return sum(1 for method, path in self.requests if method == "GET" and path.endswith(name))


@pytest.fixture
def hub():
    require_module("huggingface_hub", "pip install huggingface_hub", "anecy download")
    require_module("sentencepiece", "pip install sentencepiece", WHY)
    model = require_shared("data", "llama2-tokenizer", "tokenizer.model", why=WHY)
    train_stories, train = tiny_tinystories(300, seed=0)
    valid_stories, valid = tiny_tinystories(20, seed=1)
    h = FakeHub({
        "/datasets/roneneldan/TinyStories/resolve/main/TinyStories-train.txt": train.encode(),
        "/datasets/roneneldan/TinyStories/resolve/main/TinyStories-valid.txt": valid.encode(),
        "/hf-internal-testing/llama-tokenizer/resolve/main/tokenizer.model": model.read_bytes(),
    })
    h.train_stories, h.valid_stories, h.model = train_stories, valid_stories, model
    yield h
    h.close()


def run_download(tmp_path, *args, endpoint=None, offline=False):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(PYTHONPATH=str(ROOT), HF_HOME=str(tmp_path / "hf-home"),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_ETAG_TIMEOUT="5")
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-m", "anecy", "download", "tinystories",
                           "--no-progress", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=600)


def expected_ids(sp, stories):
    return [i for s in stories for i in [1] + sp.encode(s.strip())]


def test_download_and_prepare_every_shard(tmp_path, hub):
    spm = require_module("sentencepiece", "pip install sentencepiece", WHY)
    sp = spm.SentencePieceProcessor(model_file=str(hub.model))
    out = tmp_path / "data"
    r = run_download(tmp_path, "--shards", SHARDS, "--dir", out, "--workers", "1",
                     endpoint=hub.url)
    assert r.returncode == 0, r.stderr
    assert "ready: train with --data" in r.stdout
    assert (out / "tokenizer.model").read_bytes() == hub.model.read_bytes()
    # the shards hold every story once, in order, as llama2.c pretokenizes them
    shards = [np.fromfile(out / f"tinystories_data{k:02d}.bin", dtype="<u2")
              for k in range(SHARDS)]
    assert np.concatenate(shards).tolist() == expected_ids(sp, hub.train_stories)
    assert all(len(s) for s in shards)
    assert np.fromfile(out / "tinystories_val.bin", dtype="<u2").tolist() == \
        expected_ids(sp, hub.valid_stories)
    meta = read_sidecar(out / "tinystories_data03.bin")
    assert meta["tokenizer"] == {"kind": "sentencepiece",
                                 "path": str((out / "tokenizer.model").resolve())}
    assert meta["shard"]["index"] == 3 and meta["shard"]["of"] == SHARDS
    assert meta["val"]["path"] == "tinystories_val.bin"
    assert meta["val"]["documents"] == len(hub.valid_stories)
    assert sum(read_sidecar(out / f"tinystories_data{k:02d}.bin")["documents"]
               for k in range(SHARDS)) == len(hub.train_stories)

    # again: the files come from the cache and the shards are not redone
    before = hub.gets("TinyStories-train.txt")
    assert before == 1
    r = run_download(tmp_path, "--shards", "2", "--dir", out, endpoint=hub.url)
    assert r.returncode == 0, r.stderr
    assert hub.gets("TinyStories-train.txt") == before
    assert "tinystories_data00.bin: already prepared" in r.stdout


def test_a_dropped_download_resumes(tmp_path, hub):
    # the connection drops halfway through the training text: the client asks for the rest
    # (it keeps what it received in chunks of megabytes, so the text is 24 MB here)
    key = "/datasets/roneneldan/TinyStories/resolve/main/TinyStories-train.txt"
    data = hub.files[key] * (24_000_000 // len(hub.files[key]) + 1)
    hub.files[key] = data
    hub.drop[key] = 12 * 1024 * 1024
    r = run_download(tmp_path, "--dir", tmp_path / "d", endpoint=hub.url)
    assert r.returncode == 0, r.stderr
    gets = [rng for (method, path), rng in zip(hub.requests, hub.ranges)
            if method == "GET" and path == key]
    assert len(gets) == 2 and gets[0] is None
    start = int(re.fullmatch(r"bytes=(\d+)-", gets[1]).group(1))
    assert 0 < start <= 12 * 1024 * 1024     # from what had arrived, not from the start
    blobs = tmp_path / "hf-home" / "hub" / "datasets--roneneldan--TinyStories" / "blobs"
    assert (blobs / hashlib.sha1(data).hexdigest()).read_bytes() == data


def test_the_trainer_reads_a_downloaded_shard(tmp_path, hub):
    from anecy.config import ModelConfig, TrainConfig
    from anecy.trainer import Trainer
    out = tmp_path / "data"
    r = run_download(tmp_path, "--dir", out, endpoint=hub.url)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "tinystories_data00.bin", "tinystories_data00.bin.json", "tinystories_val.bin",
        "tinystories_val.bin.json", "tokenizer.model"]
    mc = ModelConfig.preset("tiny")
    mc.seq_len = 16
    t = Trainer(mc, TrainConfig(steps=1, data_path=str(out / "tinystories_data00.bin")),
                log=lambda *_: None)
    val = np.fromfile(out / "tinystories_val.bin", dtype="<u2")
    assert t.sampler.val_batches(1)[0][0].tolist() == val[:16].tolist()


def test_offline_names_what_to_fetch(tmp_path, hub):
    r = run_download(tmp_path, "--dir", tmp_path / "d", endpoint=hub.url, offline=True)
    assert r.returncode == 2
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "cannot fetch tokenizer.model" in line and "offline" in line
    assert f"{hub.url}/hf-internal-testing/llama-tokenizer/resolve/main/tokenizer.model" in line
    assert f"put it in {tmp_path / 'd'}/" in line
    assert not hub.requests


def test_offline_with_the_files_in_place(tmp_path, hub):
    d = tmp_path / "d"
    d.mkdir()
    shutil.copyfile(hub.model, d / "tokenizer.model")
    for name in ("TinyStories-train.txt", "TinyStories-valid.txt"):
        key = f"/datasets/roneneldan/TinyStories/resolve/main/{name}"
        (d / name).write_bytes(hub.files[key])
    r = run_download(tmp_path, "--dir", d, offline=True)
    assert r.returncode == 0, r.stderr
    assert read_sidecar(d / "tinystories_data00.bin")["documents"] > 0


def test_unreachable_hub_and_missing_files(tmp_path, hub):
    r = run_download(tmp_path, "--dir", tmp_path / "d", "--train-file", "nope.txt",
                     endpoint=hub.url)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "cannot fetch nope.txt" in r.stderr and "no such file" in r.stderr
    hub.close()   # nothing listens there any more
    r = run_download(tmp_path / "other", "--dir", tmp_path / "d2", endpoint=hub.url)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "cannot fetch tokenizer.model" in r.stderr


def test_not_the_llama2_tokenizer(tmp_path, hub):
    # a SentencePiece model of another vocabulary must not tokenize the data
    spm = require_module("sentencepiece", "pip install sentencepiece", WHY)
    import io
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(hub.train_stories), model_writer=model,
                                   vocab_size=300, model_type="bpe")
    hub.files["/hf-internal-testing/llama-tokenizer/resolve/main/tokenizer.model"] = \
        model.getvalue()
    r = run_download(tmp_path, "--dir", tmp_path / "d", endpoint=hub.url)
    assert r.returncode == 2 and "not the Llama 2 tokenizer" in r.stderr, r.stderr
    assert not (tmp_path / "d" / "tinystories_data00.bin").exists()


def test_help_and_bad_flags(tmp_path):
    r = run_download(tmp_path, "--help")
    assert r.returncode == 0 and "--shards" in r.stdout and "--tokenizer-repo" in r.stdout
    r = run_download(tmp_path, "--shards", "51", "--dir", tmp_path / "d")
    assert r.returncode == 2 and "--shards must be between 1 and 50" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "file").write_text("")
    r = run_download(tmp_path, "--dir", tmp_path / "file" / "d")
    assert r.returncode == 2 and "cannot create the directory" in r.stderr


def test_shard_bounds_cut_after_separators(tmp_path):
    p = tmp_path / "t.txt"
    _, text = tiny_tinystories(120, seed=3)
    p.write_text(text)
    data = p.read_bytes()
    bounds = shard_bounds(p, 10, b"<|endoftext|>", 10)
    assert bounds[0] == 0 and bounds[-1] == len(data) and bounds == sorted(bounds)
    for b in bounds[1:-1]:
        assert data[:b].endswith(b"<|endoftext|>")
    sizes = np.diff(bounds)
    assert sizes.max() < 2 * len(data) / 10   # about equal parts
    assert shard_bounds(p, 10, b"<|endoftext|>", 3) == bounds[:4]
