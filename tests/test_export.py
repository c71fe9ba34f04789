"""anecy export: training checkpoints to HF directories (transformers gives anecy's loss) and
llama2.c files; conversions between pretrained formats; bad output paths."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from anecy import Model, ModelConfig, TrainConfig, Trainer, llama2c
from anecy.checkpoint import load_checkpoint
from anecy.cli import anecy_main
from anecy.corpus import builtin_tokens

DATA = Path(__file__).resolve().parent / "data"


def export(args, capsys):
    code = anecy_main(["export", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def train(tmp_path, preset, steps=3, **fields):
    ckpt = tmp_path / f"{preset}.ckpt"
    tc = TrainConfig(steps=steps, accum=1, lr=1e-3, warmup=0, ckpt_path=str(ckpt))
    trainer = Trainer(ModelConfig.preset(preset, **fields), tc, log=lambda *a: None)
    trainer.run(progress=False)
    return ckpt, trainer


def full_model(trainer):
    """The checkpoint's model with the full-vocabulary softmax (training ran a compact one)."""
    model = Model(trainer.mc)
    model.params[:] = trainer.model.params
    model.weights_changed()
    return model


@pytest.mark.parametrize("preset", ["tiny", "qwen3-tiny"])
def test_hf_export_gives_anecys_loss_in_transformers(tmp_path, capsys, preset):
    ckpt, trainer = train(tmp_path, preset, **({"vocab_size": 32000} if "qwen" in preset else {}))
    capsys.readouterr()
    code, out, err = export(["--ckpt", ckpt, "--format", "hf", "--out", tmp_path / "hf"], capsys)
    assert code == 0, err
    assert "wrote" in out
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
    window = np.asarray(builtin_tokens()[1000:1000 + trainer.mc.seq_len + 1], np.int64)
    x, y = window[:-1].astype(np.int32), window[1:].astype(np.int32)
    ours = full_model(trainer).forward_backward(x, y)
    with torch.no_grad():
        logits = hf(torch.from_numpy(window[None, :-1])).logits[0]
        theirs = torch.nn.functional.cross_entropy(logits, torch.from_numpy(window[1:])).item()
    assert abs(ours - theirs) <= 1e-5 * ours, (ours, theirs)


@pytest.mark.parametrize("version", [0, 1])
def test_llama2c_export_of_a_checkpoint(tmp_path, capsys, version):
    ckpt, trainer = train(tmp_path, "tiny")
    out_file = tmp_path / "model.bin"
    code, _, err = export(["--ckpt", ckpt, "--format", "llama2c", "--out", out_file,
                           "--version", version], capsys)
    assert code == 0, err
    cfg, got_version = llama2c.read_config(out_file)
    assert got_version == version and cfg.seq_len == trainer.mc.seq_len
    model = llama2c.load(out_file)
    _, arrays = load_checkpoint(ckpt)
    np.testing.assert_array_equal(model.params, arrays["params"])
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_conversions_between_pretrained_formats(tmp_path, capsys):
    code, _, err = export(["--init-from", DATA / "llama2c_untied_v1.bin", "--format", "hf",
                           "--out", tmp_path / "hf"], capsys)
    assert code == 0, err
    code, _, err = export(["--init-from", tmp_path / "hf", "--format", "llama2c",
                           "--out", tmp_path / "back.bin", "--version", "1"], capsys)
    assert code == 0, err
    # HF directories record no context length of llama2.c's kind: the header says 2048
    original = (DATA / "llama2c_untied_v1.bin").read_bytes()
    back = (tmp_path / "back.bin").read_bytes()
    assert back[:32] == original[:32] and back[36:] == original[36:]


def test_qwen3_cannot_become_llama2c_and_nothing_is_written(tmp_path, capsys):
    ckpt, _ = train(tmp_path, "qwen3-tiny", steps=1, vocab_size=32000)
    code, _, err = export(["--ckpt", ckpt, "--format", "llama2c", "--out",
                           tmp_path / "q.bin"], capsys)
    assert code == 2 and "QK-norm" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "q.bin").exists()


@pytest.mark.parametrize("fmt,out,words", [
    ("llama2c", "missing_dir/model.bin", "no directory missing_dir"),
    ("llama2c", ".", "is a directory"),
    ("hf", "file.txt", "not a directory"),
])
def test_bad_output_paths_fail_before_the_work(tmp_path, capsys, monkeypatch, fmt, out, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    code, _, err = export(["--init-from", DATA / "llama2c_untied_v0.bin", "--format", fmt,
                           "--out", out], capsys)
    assert code == 2 and words in err, err


def test_bad_sources(tmp_path, capsys):
    code, _, err = export(["--ckpt", DATA / "llama2c_untied_v0.bin", "--format", "hf",
                           "--out", tmp_path / "x"], capsys)
    assert code == 2 and "not an anecy checkpoint" in err
    (tmp_path / "junk.bin").write_bytes(b"\0" * 10)
    code, _, err = export(["--init-from", tmp_path / "junk.bin", "--format", "hf",
                           "--out", tmp_path / "x"], capsys)
    assert code == 2 and "junk.bin" in err
