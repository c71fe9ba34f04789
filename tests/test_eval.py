"""anecy eval: the loss transformers computes on the exported model over the same windows, the
full vocabulary even for a checkpoint trained with vocabulary compaction, and bad input as one
line with exit status 2."""
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from anecy import Model, ModelConfig, TrainConfig, Trainer
from anecy.cli import anecy_main
from anecy.corpus import builtin_tokens
from anecy.evaluate import windows
from anecy.hf import save_pretrained


def run_eval(args, capsys):
    try:
        code = anecy_main(["eval", *map(str, args)])
    except SystemExit as e:   # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def token_file(path, tokens, dtype="<u2"):
    np.asarray(tokens, dtype).tofile(path)
    return path


def transformers_loss(hf_dir, tokens, seq_len, n_windows):
    """Mean next-token cross-entropy transformers computes over the same windows."""
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    losses = []
    with torch.no_grad():
        for w in range(n_windows):
            window = torch.from_numpy(np.asarray(tokens[w * seq_len:w * seq_len + seq_len + 1],
                                                 np.int64))
            logits = hf(window[None, :-1]).logits[0]
            losses.append(torch.nn.functional.cross_entropy(logits, window[1:]).item())
    return float(np.mean(losses))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny checkpoint trained a few steps with vocabulary compaction (the default), so its
    softmax ran over the built-in corpus's tokens only."""
    d = tmp_path_factory.mktemp("eval")
    ckpt = d / "t.ckpt"
    trainer = Trainer(ModelConfig.preset("tiny"),
                      TrainConfig(steps=4, accum=1, lr=1e-3, warmup=0, ckpt_path=str(ckpt)),
                      log=lambda *a: None)
    trainer.run(progress=False)
    assert trainer.model.active_ids is not None
    model = Model(trainer.mc)
    model.params[:] = trainer.model.params
    model.weights_changed()
    save_pretrained(model, d / "hf")
    return ckpt, d / "hf", trainer.mc


def test_eval_equals_transformers_loss(tmp_path, capsys, trained):
    ckpt, hf_dir, cfg = trained
    tokens = builtin_tokens()[5000:5000 + 5 * cfg.seq_len + 3]   # 5 windows and a remainder
    data = token_file(tmp_path / "val.bin", tokens)
    code, out, err = run_eval(["--ckpt", ckpt, "--data", data, "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["windows"] == 5 and result["tokens"] == 5 * cfg.seq_len
    assert result["seq_len"] == cfg.seq_len and result["tokens_per_s"] > 0
    theirs = transformers_loss(hf_dir, tokens, cfg.seq_len, 5)
    assert abs(result["loss"] - theirs) <= 1e-5 * theirs, (result["loss"], theirs)
    assert result["perplexity"] == pytest.approx(np.exp(result["loss"]), rel=1e-12)
    # the same from the HF directory, and --max-windows scores the first windows only
    code, out, err = run_eval(["--init-from", hf_dir, "--data", data, "--json",
                               "--seq-len", cfg.seq_len, "--max-windows", 2], capsys)
    assert code == 0, err
    two = json.loads(out)
    assert two["windows"] == 2
    theirs = transformers_loss(hf_dir, tokens, cfg.seq_len, 2)
    assert abs(two["loss"] - theirs) <= 1e-5 * theirs, (two["loss"], theirs)


def test_eval_text_output(tmp_path, capsys, trained):
    ckpt, _, cfg = trained
    data = token_file(tmp_path / "val.bin", builtin_tokens()[:3 * cfg.seq_len + 1])
    code, out, err = run_eval(["--ckpt", ckpt, "--data", data], capsys)
    assert code == 0, err
    assert "loss" in out and "perplexity" in out and "tokens/s" in out
    assert f"3 windows of {cfg.seq_len}" in out


def test_windows():
    assert windows(10 * 8 + 1, 8) == 10 and windows(10 * 8, 8) == 9
    assert windows(10 * 8 + 1, 8, max_windows=3) == 3


@pytest.mark.parametrize("case,says", [
    ("missing", "no such token file"),
    ("vocab", "not below vocab_size 32000"),
    ("short", "need at least seq_len + 1"),
    ("seq_len", "longer than the model's context"),
    ("max_windows", "expected a positive integer"),
    ("no_model", "no such file or directory"),
])
def test_bad_input_is_one_line(tmp_path, capsys, trained, case, says):
    ckpt, _, cfg = trained
    data = token_file(tmp_path / "val.bin", builtin_tokens()[:4 * cfg.seq_len])
    args = ["--ckpt", ckpt, "--data", data]
    if case == "missing":
        args[3] = tmp_path / "nope.bin"
    elif case == "vocab":   # ids of a larger vocabulary than the model's
        token_file(data, np.full(4 * cfg.seq_len, 40000))
    elif case == "short":
        token_file(data, builtin_tokens()[:cfg.seq_len])
    elif case == "seq_len":
        args += ["--seq-len", cfg.seq_len + 1]
    elif case == "max_windows":
        args += ["--max-windows", 0]
    elif case == "no_model":
        args[1] = tmp_path / "nope.ckpt"
    code, out, err = run_eval(args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and says in err, err
    assert out == ""


def test_eval_of_an_examples_file_equals_transformers_with_masked_labels(tmp_path, capsys):
    """On an examples file, anecy eval is the mean over the scored tokens: what transformers
    gives with labels -100 at every unscored position."""
    from test_chat import tiny_model

    from anecy.data import open_examples
    from chat_fixtures import conversation, tokenizer_dir
    hf_dir = tmp_path / "m"
    save_pretrained(tiny_model(400), hf_dir)
    tokenizer_dir(hf_dir)
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": conversation(system=i % 2 == 0,
                                                                  turns=1 + i % 3)}) + "\n"
                             for i in range(6)))
    data = tmp_path / "chats.bin"
    assert anecy_main(["prepare", str(chats), "--tokenizer", str(hf_dir), "--format", "chat",
                       "--mask-prompt", "--out", str(data), "--no-progress"]) == 0
    capsys.readouterr()
    code, out, err = run_eval(["--init-from", hf_dir, "--data", data, "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    total, scored = 0.0, 0
    for ids, mask in open_examples(data):
        labels = torch.tensor(np.where(mask, ids, -100)[1:].astype(np.int64))
        with torch.no_grad():
            logits = hf(torch.tensor(ids[None].astype(np.int64))).logits[0, :-1]
        total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100,
                                                   reduction="sum").item()
        scored += int((labels != -100).sum())
    assert result["tokens"] == scored and result["windows"] == 6
    assert result["loss"] == pytest.approx(total / scored, rel=1e-5)
