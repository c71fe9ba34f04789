"""anecy eval: a model's mean loss and perplexity on a token file."""

import json
import sys

from ._args import add_model_source, model_source, positive_int

HELP = "mean loss and perplexity of a model on a token file (full vocabulary)"
MAX_DEFAULT_SEQ_LEN = 1024   # windows of an HF model's whole context (40960 for Qwen3) are slow


def add_arguments(p):
    add_model_source(p, "or pretrained weights: a llama2.c .bin file or an HF directory")
    p.add_argument("--adapter", metavar="DIR",
                   help="a PEFT LoRA adapter directory for the model given, fused into it")
    p.add_argument("--data", metavar="FILE", required=True,
                   help="a token file (`anecy prepare`, `anecy download`, llama2.c's .bin)")
    p.add_argument("--seq-len", type=positive_int, metavar="N",
                   help="tokens of context per window (default: the model's context, at most "
                        f"{MAX_DEFAULT_SEQ_LEN})")
    p.add_argument("--max-windows", type=positive_int, metavar="N",
                   help="score only the first N windows (default: all)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (loss, perplexity, windows, seq_len, tokens, "
                        "seconds, tokens_per_s) instead of text")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from ..data import is_examples_file, open_examples, open_tokens
    from ..errors import AnecyError
    from ..evaluate import evaluate, evaluate_examples
    from ..pretrained import load
    source = model_source(args)
    adapters = None
    if args.adapter:
        from ..lora import read_peft
        if source.kind == "lora":
            raise AnecyError(f"{source.path} holds adapters already; --adapter goes with a "
                             "base model")
        adapters = read_peft(args.adapter, source.config)   # checked before anything is loaded
    context = source.config.seq_len
    seq_len = args.seq_len or min(context, MAX_DEFAULT_SEQ_LEN)
    if seq_len > context:
        raise AnecyError(f"--seq-len {seq_len} is longer than the model's context of {context}")
    examples = is_examples_file(args.data)
    if examples:
        data = open_examples(args.data, source.config.vocab_size)
    else:
        data = open_tokens(args.data, source.config.vocab_size, seq_len)
    model = load(source, seq_len=seq_len)
    if adapters is not None:
        from ..lora import fuse
        fuse(model, adapters, inplace=True)
    result = (evaluate_examples if examples else evaluate)(
        model, data, args.max_windows,
                      progress=not args.no_progress and not args.json and sys.stderr.isatty())
    result = {"data": str(args.data), "model": str(source.path),
              "adapter": args.adapter, **result}
    if args.json:
        print(json.dumps(result))
    else:
        fused = f" with {args.adapter}" if args.adapter else ""
        print(f"{source.describe}{fused} on {args.data}: loss {result['loss']:.4f}, perplexity "
              f"{result['perplexity']:.3f} over {result['tokens']} "
              + (f"scored tokens of {result['windows']} examples (a window of at most "
                 f"{seq_len} each)" if examples else
                 f"tokens ({result['windows']} windows of {seq_len})")
              + f", {result['tokens_per_s']:.0f} tokens/s")
    return 0
