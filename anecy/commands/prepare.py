"""anecy prepare: text or JSONL to a token file (and its sidecar) for training."""

from ._args import non_negative_int, number

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


def run(args) -> int:
    from ..prepare import prepare
    prepare(args.inputs, args.tokenizer, args.out, val_frac=args.val_frac,
            separator=args.separator, workers=args.workers or None,
            progress=not args.no_progress)
    return 0
