"""anecy export: write a model as a Hugging Face directory, a llama2.c .bin file or a GGUF
file (llama.cpp, Ollama)."""

import sys
from pathlib import Path

HELP = ("write a checkpoint's model as a Hugging Face directory, a llama2.c .bin file or a "
        "GGUF file")


def add_arguments(p):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", metavar="PATH", help="an anecy training checkpoint")
    src.add_argument("--init-from", metavar="PATH",
                     help="or convert pretrained weights: a llama2.c .bin or an HF directory")
    p.add_argument("--format", choices=("hf", "llama2c", "gguf"), required=True,
                   help="hf: a directory transformers loads (config.json + model.safetensors); "
                        "llama2c: a .bin file llama2.c's run.c reads; gguf: one file with the "
                        "tokenizer, what llama.cpp and Ollama run")
    p.add_argument("--out", metavar="PATH", required=True, help="the directory or file to write")
    p.add_argument("--version", type=int, choices=(0, 1), default=0,
                   help="llama2.c format version: 0 (legacy, what run.c reads; default) or 1")
    p.add_argument("--dtype", choices=("f32", "f16", "q8_0"),
                   help="GGUF tensor type (default f32); norm weights always stay f32")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="GGUF: the tokenizer to put in the file, tokenizer.model, llama2.c's "
                        "tokenizer.bin, tokenizer.json or an HF directory (default: the one the "
                        "checkpoint's data was prepared with, or the HF directory's own)")


def run(args) -> int:
    from ..errors import AnecyError
    from ..fileio import check_writable
    from ..pretrained import inspect, load, tokenizer_for
    out = Path(args.out)
    if args.format != "gguf" and (args.dtype or args.tokenizer):
        raise AnecyError(f"--{'dtype' if args.dtype else 'tokenizer'} applies to --format gguf "
                         "only")
    source = inspect(args.ckpt, "checkpoint") if args.ckpt else inspect(args.init_from, "init")
    cfg = source.config
    if args.format == "gguf":
        from ..gguf_export import check_exportable, check_tokenizer, save
        check_exportable(cfg)
        tok = tokenizer_for(source, args.tokenizer)
        if tok is None:
            raise AnecyError(f"no tokenizer known for {source.describe}, and a GGUF file holds "
                             "its tokenizer: name one with --tokenizer")
        check_tokenizer(tok, cfg.vocab_size)
        check_writable(out, what="GGUF file")
        save(load(source), out, tok, dtype=args.dtype or "f32", context_length=cfg.seq_len,
             name=source.path.stem, progress=sys.stderr.isatty())
    elif args.format == "llama2c":
        from ..llama2c import check_exportable, save
        check_exportable(cfg)
        check_writable(out, what="llama2.c file")
        save(load(source), out, version=args.version, seq_len=cfg.seq_len)
    else:
        from ..hf import config_to_hf, save_pretrained
        config_to_hf(cfg)
        check_writable(out / "model.safetensors", what="HF model file", make_parents=True)
        save_pretrained(load(source), out)
    print(f"wrote {out} ({args.format}) from {source.describe}")
    return 0
