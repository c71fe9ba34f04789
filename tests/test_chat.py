"""anecy chat and the decoding Session under it: replies equal greedy generation on the
template's rendering of the conversation, and a new turn prefills only what is new."""
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anecy import Model, ModelConfig
from anecy.cli import anecy_main
from anecy.generate import Decoder, SamplingConfig, Session, generate
from chat_fixtures import CHATML, tokenizer_dir
from conftest import require_module

ROOT = Path(__file__).resolve().parents[1]
GREEDY = SamplingConfig(temperature=0)
SYSTEM = "Be brief."
# ChatML that shows earlier answers only as a placeholder, as templates that drop earlier
# reasoning do: the next turn's rendering is not the previous one continued
FORGETFUL = CHATML.replace("m.content + '<|im_end|>\\n'",
                           "(m.content if loop.last or m.role != 'assistant' else 'earlier')"
                           " + '<|im_end|>\\n'")


def tiny_model(vocab_size, seed=3):
    cfg = ModelConfig(dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                      vocab_size=vocab_size, seq_len=512, rope_style="half", qk_norm=True,
                      norm_eps=1e-6, rope_theta=1e6)
    model = Model(cfg, seed=seed)
    model.params[...] *= 4   # sharper logits: the greedy text varies, the argmax is no near-tie
    model.weights_changed()
    return model


def model_dir(path, template=CHATML, vocab_size=400):
    """A tiny random Qwen3-style model saved as a Hugging Face directory with a tokenizer."""
    from anecy.hf import save_pretrained
    save_pretrained(tiny_model(vocab_size), path)
    tokenizer_dir(path, template)
    return path


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    require_module("transformers", 'pip install "anecy[data]"', "chat templates")
    return model_dir(tmp_path_factory.mktemp("chat") / "m")


def loaded(directory):
    from anecy.chat_data import ChatTemplate
    from anecy.pretrained import inspect, load
    return load(inspect(directory, "init")), ChatTemplate(directory)


def greedy_reply(model, template, messages, n):
    """What `anecy sample` does (a fresh decoder, greedy) on the rendered conversation."""
    prompt = template.render(messages, add_generation_prompt=True)
    return template.decode(generate(model, prompt, n, GREEDY, template.stop_ids)), prompt


def common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_chat_through_a_pipe_replies_as_greedy_sampling(chatml_dir):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    lines = ["Hello there!", "What is the capital of France?", "/reset", "Hello there!"]
    r = subprocess.run([sys.executable, "-m", "anecy", "chat", "--init-from", str(chatml_dir),
                        "--temperature", "0", "--max-new-tokens", "12", "--stats",
                        "--system", SYSTEM], input="\n".join(lines) + "\n", env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    model, template = loaded(chatml_dir)
    system = [{"role": "system", "content": SYSTEM}]
    first = [{"role": "user", "content": lines[0]}]
    reply1, prompt1 = greedy_reply(model, template, system + first, 12)
    second = first + [{"role": "assistant", "content": reply1},
                      {"role": "user", "content": lines[1]}]
    reply2, prompt2 = greedy_reply(model, template, system + second, 12)
    assert r.stdout == f"{reply1}\n{reply2}\n{reply1}\n"
    prefilled = [int(n) for n in re.findall(r"prefilled (\d+) tokens", r.stderr)]
    # the second turn reuses at least the first turn's prompt; /reset starts over
    assert prefilled[0] == len(prompt1) and prefilled[2] == len(prompt1)
    assert 0 < prefilled[1] <= len(prompt2) - len(prompt1)


@pytest.mark.parametrize("template", ["chatml", "forgetful"])
def test_a_new_turn_prefills_only_what_changed(tmp_path, chatml_dir, template):
    from anecy.commands.chat import Chat
    directory = chatml_dir
    if template == "forgetful":
        directory = model_dir(tmp_path / "m", FORGETFUL)
    model, tpl = loaded(directory)
    shown = []
    chat = Chat(tpl, Session(model, max_len=300, sampling=GREEDY), 10, system=SYSTEM,
                write=shown.append, log=lambda _: None)
    reply1 = chat.turn("Hello there!")
    assert "".join(shown) == reply1 + "\n"
    cached = list(chat.session.tokens)
    computed = chat.session.decoder.prefilled   # positions the compiled decoder prefilled
    assert computed == chat.last["prefilled"]
    reply2 = chat.turn("Tell me a story.")
    prompt2 = tpl.render(chat.conversation(chat.messages[:3]), add_generation_prompt=True)
    reuse = common_prefix(cached, prompt2)
    assert chat.last["prefilled"] == len(prompt2) - reuse
    # the second turn's prompt went through the layers from where it differs, no earlier
    assert chat.session.decoder.prefilled - computed == len(prompt2) - reuse
    prompt1 = tpl.render(chat.conversation(chat.messages[:1]), add_generation_prompt=True)
    if template == "chatml":
        assert reuse >= len(prompt1)
    else:   # the first answer is rendered otherwise now: prefill again from where it starts
        assert reuse == len(prompt1)
    assert reply2 == greedy_reply(model, tpl, chat.conversation(chat.messages[:3]), 10)[0]
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] * 2


def test_session_reuses_its_cache():
    model = tiny_model(97)
    rng = np.random.default_rng(0)
    a, b, c = (rng.integers(0, 97, n).tolist() for n in (9, 5, 4))
    session = Session(model, max_len=40, sampling=GREEDY)
    session.feed(a)
    logits = session.feed(a + b)
    assert session.prefilled == len(a) + len(b) and session.tokens == a + b
    fresh = Decoder(model, max_len=40).step(a + b)
    np.testing.assert_allclose(logits, fresh, rtol=1e-4, atol=1e-4 * np.abs(fresh).max())
    logits = session.feed(a + c)          # a different tail: back to the end of a
    assert session.prefilled == len(a) + len(b) + len(c)
    np.testing.assert_allclose(logits, Decoder(model, max_len=40).step(a + c), rtol=1e-4,
                               atol=1e-4 * np.abs(fresh).max())
    session.feed(a + c)                   # nothing new: the last token again, for its logits
    assert session.prefilled == len(a) + len(b) + len(c) + 1
    got = list(session.reply(6))
    assert got == list(generate(model, a + c, 6, SamplingConfig(temperature=0)))
    assert session.tokens == a + c + got[:-1]   # the last one is fed by the next feed


def test_ctrl_c_stops_a_reply_and_keeps_what_was_shown(chatml_dir):
    from anecy.commands.chat import Chat
    model, tpl = loaded(chatml_dir)
    shown, pressed = [], []

    def write(piece):
        if len(shown) == 4 and not pressed:
            pressed.append(True)
            raise KeyboardInterrupt
        shown.append(piece)

    chat = Chat(tpl, Session(model, max_len=300, sampling=GREEDY), 30, write=write,
                log=lambda _: None)
    partial = chat.turn("Hello there!")
    assert chat.messages[1] == {"role": "assistant", "content": partial}
    assert pressed and "".join(shown) == partial + "\n"
    shown.clear()
    chat.write = shown.append
    chat.turn("And then?")                 # the conversation goes on
    assert len(chat.messages) == 4


def run_chat(monkeypatch, capsys, *args, stdin=""):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = anecy_main(["chat", *map(str, args)])
    return code, capsys.readouterr()


def one_line(code, err, *needles):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_chat_commands_and_bad_input(tmp_path, monkeypatch, capsys, chatml_dir):
    code, out = run_chat(monkeypatch, capsys, "--init-from", chatml_dir, "--temperature", "0",
                         "--max-new-tokens", "5", stdin="/system Be brief.\nHi\n/reset\n\nHi\n")
    assert code == 0, out.err
    replies = out.out.splitlines()
    assert len(replies) >= 2 and replies[0] == replies[-1]
    # a tokenizer of a larger vocabulary than the model's
    small = tmp_path / "small"
    from anecy.hf import save_pretrained
    save_pretrained(tiny_model(300), small)
    one_line(*_code_err(run_chat(monkeypatch, capsys, "--init-from", small, "--tokenizer",
                                 chatml_dir, stdin="Hi\n")),
             "has 400 tokens, more than the model's vocabulary of 300")
    plain = tokenizer_dir(tmp_path / "plain", None)
    one_line(*_code_err(run_chat(monkeypatch, capsys, "--init-from", chatml_dir, "--tokenizer",
                                 plain, stdin="Hi\n")), "has no chat template")
    one_line(*_code_err(run_chat(monkeypatch, capsys, "--init-from", small, stdin="Hi\n")),
             "no Hugging Face tokenizer with a chat template known")
    one_line(*_code_err(run_chat(monkeypatch, capsys, "--init-from", chatml_dir, "--context",
                                 "8", stdin="Hello there, how are you?\n")),
             "the conversation takes", "the context 8")


def _code_err(result):
    code, captured = result
    return code, captured.err
