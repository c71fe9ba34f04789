"""anecy prepare --format: chat, completions and text records as examples files, checked
against transformers' apply_chat_template, and the examples file format itself."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anecy.chat_data import ChatTemplate, prepare_examples
from anecy.cli import anecy_main
from anecy.data import (
    DataError,
    mask_path,
    offsets_path,
    open_examples,
    open_tokens,
    read_examples,
    read_sidecar,
    sidecar_path,
)
from chat_fixtures import BROKEN, CHATML, LLAMA2, TOOLS, conversation, tokenizer_dir
from conftest import require_module

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(progress=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def transformers():
    return require_module("transformers", 'pip install "anecy[data]"',
                          "chat templates are rendered by transformers")


def hf_tokenizer(directory):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(directory))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def assistant_spans(hf, messages, tools, stop):
    """[start, end] (inclusive) of each assistant turn in the whole rendering, by the
    template's own rendering of the conversation before it with the generation prompt, up
    to and including the first ``stop`` token after it."""
    ids = hf.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(hf.apply_chat_template(messages[:i], tools=tools, tokenize=True,
                                               return_dict=False, add_generation_prompt=True))
            spans.append((start, ids.index(stop, start)))
    return ids, spans


CASES = {
    # template, tools, the id of its end-of-turn token in the test vocabulary
    "chatml-tools": (CHATML, TOOLS, "<|im_end|>"),
    "chatml": (CHATML, None, "<|im_end|>"),
    "llama2": (LLAMA2, None, "</s>"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendering_and_masks_match_apply_chat_template(tmp_path, transformers, case):
    template, tools, end_of_turn = CASES[case]
    tok_dir = tokenizer_dir(tmp_path / "tok", template)
    hf = hf_tokenizer(tok_dir)
    stop = hf.convert_tokens_to_ids(end_of_turn)
    chats = [conversation(system=True, turns=3), conversation(system=False, turns=1),
             conversation(system=True, turns=1)]
    records = [dict({"messages": m}, **({"tools": tools} if tools else {})) for m in chats]
    if template is CHATML:   # a tool result between two assistant turns
        records.append({"messages": [{"role": "user", "content": "ask"},
                                     {"role": "assistant", "content": "call"},
                                     {"role": "tool", "content": "sunny"},
                                     {"role": "assistant", "content": "It is sunny."}]})
    data = write_jsonl(tmp_path / "chat.jsonl", records)
    out = tmp_path / "chat.bin"
    meta = prepare_examples([data], tok_dir, out, mask_prompt=True, **QUIET)
    got = list(read_examples(out))
    assert len(got) == len(records) == meta["examples"]
    for (ids, mask), record in zip(got, records):
        messages, rtools = record["messages"], record.get("tools")
        want, spans = assistant_spans(hf, messages, rtools, stop)
        assert ids.tolist() == want
        expected = np.zeros(len(want), bool)
        for start, end in spans:
            expected[start:end + 1] = True
        assert mask.tolist() == expected.tolist()
        # each span is the answer's text and its end-of-turn token, nothing else
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        for (start, end), answer in zip(spans, answers):
            assert hf.decode(want[start:end]).strip() == answer
            assert want[end] == stop
    assert meta["end_of_turn_id"] == stop and meta["mask_prompt"] is True
    assert meta["scored_tokens"] == sum(int(m.sum()) for _, m in got)
    # without --mask-prompt every token but each example's first is scored
    prepare_examples([data], tok_dir, tmp_path / "all.bin", **QUIET)
    for (ids, mask), (ids2, _) in zip(read_examples(tmp_path / "all.bin"), got):
        assert ids.tolist() == ids2.tolist()
        assert not mask[0] and mask[1:].all()


def test_completions_and_text_records(tmp_path, transformers):
    tok_dir = tokenizer_dir(tmp_path / "tok", LLAMA2)
    hf = hf_tokenizer(tok_dir)
    comp = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "How are you?", "completion": "Fine."}])
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "  Hello world!\n"}, {"text": " "}])
    plain = tmp_path / "p.txt"
    plain.write_text("first story\n\nsecond story\n", encoding="utf-8")
    out = tmp_path / "x.bin"
    meta = prepare_examples([comp, text, plain], tok_dir, out, mask_prompt=True, **QUIET)
    got = list(read_examples(out))
    chat = [{"role": "user", "content": "How are you?"},
            {"role": "assistant", "content": "Fine."}]
    want, [(start, end)] = assistant_spans(hf, chat, None, hf.eos_token_id)
    assert got[0][0].tolist() == want
    assert np.flatnonzero(got[0][1]).tolist() == list(range(start, end + 1))
    # text: BOS, the ids, EOS; all scored but the first (--mask-prompt concerns turns only)
    bos, eos = hf.bos_token_id, hf.eos_token_id
    for (ids, mask), text in zip(got[1:], ["Hello world!", "first story", "second story"]):
        assert ids.tolist() == [bos] + hf.encode(text, add_special_tokens=False) + [eos]
        assert not mask[0] and mask[1:].all()
    assert len(got) == 4   # the blank text record is skipped
    assert meta["records"] == {"completions": 1, "text": 3}


def test_examples_file_format_and_held_out_split(tmp_path, transformers):
    tok_dir = tokenizer_dir(tmp_path / "tok", CHATML)
    records = [{"messages": conversation(system=k % 2 == 0, turns=1 + k % 3)} for k in range(10)]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    out = tmp_path / "d.bin"
    meta = prepare_examples([data], tok_dir, out, mask_prompt=True, val_frac=0.3, **QUIET)
    hf = hf_tokenizer(tok_dir)
    val = tmp_path / "d.val.bin"
    train_ids, val_ids = [ids.tolist() for ids, _ in read_examples(out)], \
        [ids.tolist() for ids, _ in read_examples(val)]
    held = [k for k in range(10) if int((k + 1) * 0.3) > int(k * 0.3)]
    renders = [hf.apply_chat_template(r["messages"], tokenize=True, return_dict=False)
               for r in records]
    assert val_ids == [renders[k] for k in held]
    assert train_ids == [renders[k] for k in range(10) if k not in held]
    # the files, read here without anecy: ids back to back, uint64 offsets, little-endian bits
    for path, ids_list in ((out, train_ids), (val, val_ids)):
        side = read_sidecar(path)
        flat = np.fromfile(path, dtype="<u2")
        offsets = np.fromfile(offsets_path(path), dtype="<u8")
        bits = np.unpackbits(np.fromfile(mask_path(path), dtype=np.uint8), bitorder="little")
        assert flat.tolist() == [i for ids in ids_list for i in ids]
        assert offsets.tolist() == np.cumsum([0] + [len(i) for i in ids_list]).tolist()
        assert bits.size == 8 * ((flat.size + 7) // 8) and not bits[flat.size:].any()
        masks = [m for _, m in read_examples(path)]
        assert bits[:flat.size].astype(bool).tolist() == np.concatenate(masks).tolist()
        assert (side["format"], side["examples"], side["tokens"]) == \
            ("anecy-tokens-2", len(ids_list), flat.size)
        assert side["scored_tokens"] == int(bits.sum())
    assert meta["val"] == {"path": "d.val.bin", "fraction": 0.3, "examples": len(val_ids),
                           "tokens": sum(map(len, val_ids)),
                           "scored_tokens": read_sidecar(val)["scored_tokens"],
                           "max_example_tokens": max(map(len, val_ids))}


def test_truncated_dropped_and_unscored_examples_are_counted(tmp_path, transformers):
    tok_dir = tokenizer_dir(tmp_path / "tok", CHATML)
    hf = hf_tokenizer(tok_dir)
    long_system = {"role": "system", "content": "You are a helpful assistant. " * 20}
    records = [{"messages": conversation(system=False, turns=1)},          # short
               {"messages": conversation(system=False, turns=3)},          # long, answers early
               {"messages": [long_system] + conversation(system=False)}]   # answers past the cut
    lengths = [len(hf.apply_chat_template(r["messages"], tokenize=True, return_dict=False))
               for r in records]
    seq_len = lengths[0] + 5
    assert lengths[1] > seq_len and lengths[2] > seq_len
    data = write_jsonl(tmp_path / "d.jsonl", records)
    meta = prepare_examples([data], tok_dir, tmp_path / "a.bin", mask_prompt=True,
                            seq_len=seq_len, **QUIET)
    assert (meta["examples"], meta["truncated"], meta["dropped_unscored"],
            meta["dropped_long"]) == (2, 2, 1, 0)
    got = list(read_examples(tmp_path / "a.bin"))
    assert [len(ids) for ids, _ in got] == [lengths[0], seq_len]
    assert meta["max_example_tokens"] == seq_len
    meta = prepare_examples([data], tok_dir, tmp_path / "b.bin", mask_prompt=True,
                            seq_len=seq_len, drop_long=True, **QUIET)
    assert (meta["examples"], meta["truncated"], meta["dropped_long"]) == (1, 0, 2)


# -- bad input: one line, exit status 2 ---------------------------------------------------------

def run_prepare(capsys, *args):
    code = anecy_main(["prepare", "--no-progress", *map(str, args)])
    err = capsys.readouterr().err
    return code, err


def one_line(code, err, *needles):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


BAD_RECORDS = {
    "not-json": ('{"messages": [', "d.jsonl:2: not a JSON line"),
    "empty": ({"messages": []}, "d.jsonl:2: \"messages\" is an empty conversation"),
    "not-a-list": ({"messages": "hi"}, "\"messages\" is a str, not a list"),
    "order": ({"messages": [{"role": "assistant", "content": "a"}]},
              "message 1: a assistant turn cannot follow the start (roles out of order)"),
    "user-user": ({"messages": [{"role": "user", "content": "a"},
                                {"role": "user", "content": "b"},
                                {"role": "assistant", "content": "c"}]},
                  "message 2: a user turn cannot follow a user turn"),
    "late-system": ({"messages": [{"role": "user", "content": "a"},
                                  {"role": "system", "content": "b"}]},
                    "message 2: a system turn cannot follow a user turn"),
    "no-answer": ({"messages": [{"role": "user", "content": "a"}]},
                  "ends with a user turn, not the assistant's"),
    "content": ({"messages": [{"role": "user", "content": [{"type": "text"}]},
                              {"role": "assistant", "content": "b"}]},
                "message 1 (user): 'content' is a list, not a string"),
    "role": ({"messages": [{"role": "robot", "content": "a"}]}, "role 'robot' is not one of"),
    "tools": ({"messages": conversation(), "tools": "all"}, "\"tools\" must be a list"),
    "completion": ({"prompt": "a", "completion": 3}, "'completion' is a int, not a string"),
    "mixed": ({"text": "plain"}, "d.jsonl:2: a text record in a file of chat records"),
    "unknown": ([1, 2], "d.jsonl:2: a JSON line must be an object, not a list"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_records(tmp_path, capsys, transformers, case):
    tok_dir = tokenizer_dir(tmp_path / "tok", CHATML)
    record, needle = BAD_RECORDS[case]
    first = ({"prompt": "p", "completion": "c"} if case == "completion"
             else {"messages": conversation()})
    line = record if isinstance(record, str) else json.dumps(record)
    (tmp_path / "d.jsonl").write_text(json.dumps(first) + "\n" + line + "\n")
    code, err = run_prepare(capsys, tmp_path / "d.jsonl", "--tokenizer", tok_dir,
                            "--out", tmp_path / "o.bin", "--mask-prompt")
    one_line(code, err, needle)
    assert not (tmp_path / "o.bin").exists() and not offsets_path(tmp_path / "o.bin").exists()


def test_bad_templates_and_flags(tmp_path, capsys, transformers):
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": conversation()}])
    out = tmp_path / "o.bin"
    plain = tokenizer_dir(tmp_path / "plain", None)
    one_line(*run_prepare(capsys, data, "--tokenizer", plain, "--out", out),
             "its tokenizer has no chat template", "--chat-template")
    # --chat-template supplies one
    (tmp_path / "t.jinja").write_text(CHATML)
    assert run_prepare(capsys, data, "--tokenizer", plain, "--out", out, "--chat-template",
                       tmp_path / "t.jinja")[0] == 0
    assert read_sidecar(out)["chat_template"]["source"] == str(tmp_path / "t.jinja")
    broken = tokenizer_dir(tmp_path / "broken", BROKEN)
    one_line(*run_prepare(capsys, data, "--tokenizer", broken, "--out", out, "--mask-prompt"),
             "d.jsonl:1: the chat template renders the conversation before assistant turn 1",
             "not a prefix")
    silent = tokenizer_dir(tmp_path / "silent", CHATML.replace("'<|im_end|>\\n'", "'\\n'"))
    one_line(*run_prepare(capsys, data, "--tokenizer", silent, "--out", out),
             "writes no special token after an assistant's text")
    text = tmp_path / "t.txt"
    text.write_text("some text\n")
    one_line(*run_prepare(capsys, text, "--tokenizer", plain, "--out", out, "--mask-prompt"),
             "--mask-prompt: for examples files; add --format")
    one_line(*run_prepare(capsys, text, "--tokenizer", broken, "--out", out, "--format", "chat"),
             "t.txt: not JSON lines; --format chat reads JSONL")
    one_line(*run_prepare(capsys, data, "--tokenizer", plain, "--out", out, "--seq-len", "1",
                          "--chat-template", tmp_path / "t.jinja"), "--seq-len must be")


def test_examples_files_are_not_token_streams_but_train(tmp_path, transformers):
    tok_dir = tokenizer_dir(tmp_path / "tok", CHATML)
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": conversation()}] * 4)
    out = tmp_path / "d.bin"
    prepare_examples([data], tok_dir, out, **QUIET)
    with pytest.raises(DataError, match="more than the model's vocabulary of 300"):
        open_tokens(out, 300, 4)
    with pytest.raises(DataError, match="more than the model's vocabulary of 300"):
        open_examples(out, 300)
    with pytest.raises(DataError, match="holds examples with loss masks.*not a token stream"):
        open_tokens(out, 32000, 4)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "anecy", "train", "--preset", "tiny", "--steps",
                        "1", "--data", str(out), "--ckpt", str(tmp_path / "c.ckpt"),
                        "--backend", "cpu", "--no-progress", "--seq-len", "128"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "c.ckpt").exists()


def corrupt(tmp_path, transformers):
    tok_dir = tokenizer_dir(tmp_path / "tok", CHATML)
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": conversation(turns=k)}
                                              for k in (1, 2, 3)])
    out = tmp_path / "d.bin"
    prepare_examples([data], tok_dir, out, mask_prompt=True, **QUIET)
    return out


def test_corrupt_examples_files(tmp_path, transformers):
    out = corrupt(tmp_path, transformers)
    good = {p: p.read_bytes() for p in (out, offsets_path(out), mask_path(out),
                                        sidecar_path(out))}
    assert len(list(read_examples(out))) == 3

    def broken(path, data, match):
        path.write_bytes(data)
        with pytest.raises(DataError, match=match):
            list(read_examples(out))
        for p, b in good.items():
            p.write_bytes(b)

    ids, offsets, mask, side = (good[p] for p in (out, offsets_path(out), mask_path(out),
                                                  sidecar_path(out)))
    broken(out, ids[:-2], "but its sidecar says")
    broken(offsets_path(out), offsets[:-8], "d.bin.examples has")
    broken(mask_path(out), mask[:-1], "d.bin.mask has")
    o = np.frombuffer(offsets, "<u8").copy()
    o[1] -= 2   # example 1 would start at example 0's end-of-turn token, which is scored
    broken(offsets_path(out), o.tobytes(), "scores the first token of example 1")
    o = np.frombuffer(offsets, "<u8").copy()
    o[1] = o[0] + 1
    broken(offsets_path(out), o.tobytes(), "examples of 2 tokens or more")
    bits = np.frombuffer(mask, np.uint8).copy()
    bits[0] |= 1
    broken(mask_path(out), bits.tobytes(), "scores the first token of example 0")
    bits = np.frombuffer(mask, np.uint8).copy()
    bits[:] = 0
    broken(mask_path(out), bits.tobytes(), "scores 0 tokens, the sidecar says")
    meta = json.loads(side)
    broken(sidecar_path(out), json.dumps(dict(meta, scored_tokens=1)).encode(), "scores")
    broken(sidecar_path(out), json.dumps(dict(meta, examples="3")).encode(),
           "'examples' missing or not int")
    broken(sidecar_path(out), json.dumps(dict(meta, seq_len=4)).encode(),
           "more than the sidecar's seq_len 4")
    ids_arr = np.frombuffer(ids, "<u2").copy()
    ids_arr[3] = 999
    broken(out, ids_arr.tobytes(), "token id 999 at position 3 is not below vocab_size 400")
    offsets_path(out).unlink()
    with pytest.raises(DataError, match="d.bin.examples: no such file"):
        open_examples(out)
    offsets_path(out).write_bytes(offsets)
    sidecar_path(out).write_text(json.dumps(dict(meta, format="anecy-tokens-1")))
    with pytest.raises(DataError, match="not an examples file"):
        open_examples(out)


def test_chat_template_object(tmp_path, transformers):
    # the end-of-turn token and stop ids, read from the template itself
    chatml = ChatTemplate(tokenizer_dir(tmp_path / "a", CHATML))
    llama = ChatTemplate(tokenizer_dir(tmp_path / "b", LLAMA2) / "tokenizer.json")
    ids = chatml.tok.convert_tokens_to_ids
    assert chatml.end_of_turn_id == ids("<|im_end|>")
    assert chatml.stop_ids == sorted([ids("<|im_end|>"), ids("<|endoftext|>")])
    assert llama.end_of_turn_id == llama.eos_id == ids("</s>") and llama.stop_ids == [ids("</s>")]
