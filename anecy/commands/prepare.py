"""anecy prepare: text or JSONL to a token file (and its sidecar) for training; with
--format (or chat and completions records), an examples file with loss masks."""

from ..errors import AnecyError
from ._args import non_negative_int, number, positive_int

HELP = "tokenize text or JSONL documents into a token file for training"


def add_arguments(p):
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="plain text (documents separated by blank lines) or JSONL with a "
                        '"text" field per line (by extension .jsonl, or by content)')
    p.add_argument("--tokenizer", required=True, metavar="TOK",
                   help="a SentencePiece .model, a llama2.c tokenizer.bin, a Hugging Face "
                        "tokenizer.json or a model directory holding one")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="token file to write (uint16 ids when the vocabulary fits, else "
                        "uint32), with its sidecar PATH.json")
    p.add_argument("--val-frac", type=number, default=0.0, metavar="F",
                   help="hold out this fraction of the documents, evenly spread, in a "
                        "separate file (tokens.bin -> tokens.val.bin) that training "
                        "evaluates on (default 0: none)")
    p.add_argument("--separator", metavar="TEXT",
                   help="split plain text into documents at TEXT (e.g. '<|endoftext|>') "
                        "instead of at blank lines")
    p.add_argument("--workers", type=non_negative_int, default=0, metavar="N",
                   help="worker processes, at most one per core (default 0: one per core)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    ex = p.add_argument_group(
        "examples", "write whole examples with loss masks (docs/chat.md): chat, completions "
        "and text records, chat ones in the tokenizer's chat template")
    ex.add_argument("--format", choices=("auto", "chat", "completions", "text"),
                    help='JSONL records: {"messages": [...]}, {"prompt", "completion"} or '
                         '{"text"}; auto (the default when records are chat or completions) '
                         "decides from each file's first record")
    ex.add_argument("--chat-template", metavar="FILE",
                    help="a Jinja chat template to use instead of the tokenizer's "
                         "(tokenizer_config.json's chat_template)")
    ex.add_argument("--mask-prompt", action="store_true",
                    help="score the assistant turns only (each with its end-of-turn token); "
                         "default: every token")
    ex.add_argument("--seq-len", type=positive_int, metavar="N",
                    help="examples longer than N tokens are truncated (default 256, anecy "
                         "train's default --seq-len)")
    ex.add_argument("--drop-long", action="store_true",
                    help="drop examples longer than --seq-len instead of truncating them")


EXAMPLE_FLAGS = ("chat_template", "mask_prompt", "seq_len", "drop_long")


def run(args) -> int:
    from ..chat_data import DEFAULT_SEQ_LEN, holds_conversations, prepare_examples
    from ..prepare import prepare
    fmt = args.format or ("auto" if holds_conversations(args.inputs) else None)
    if fmt is not None:
        prepare_examples(args.inputs, args.tokenizer, args.out, fmt=fmt,
                         chat_template=args.chat_template, mask_prompt=args.mask_prompt,
                         seq_len=args.seq_len or DEFAULT_SEQ_LEN, drop_long=args.drop_long,
                         val_frac=args.val_frac, separator=args.separator,
                         progress=not args.no_progress)
        return 0
    given = [f for f in EXAMPLE_FLAGS if getattr(args, f) not in (None, False)]
    if given:
        flags = ", ".join("--" + f.replace("_", "-") for f in given)
        raise AnecyError(f"{flags}: for examples files; add --format (e.g. --format text) to "
                         "write the documents as examples")
    prepare(args.inputs, args.tokenizer, args.out, val_frac=args.val_frac,
            separator=args.separator, workers=args.workers or None,
            progress=not args.no_progress)
    return 0
