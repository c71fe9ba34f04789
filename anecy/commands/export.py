"""anecy export: write a model as a Hugging Face directory or a llama2.c .bin file."""

from pathlib import Path

from ._args import add_model_source, model_source

HELP = "write a checkpoint's model as a Hugging Face directory or a llama2.c .bin file"


def add_arguments(p):
    add_model_source(p, "or convert pretrained weights: a llama2.c .bin or an HF directory")
    p.add_argument("--format", choices=("hf", "llama2c"), required=True,
                   help="hf: a directory transformers loads (config.json + model.safetensors); "
                        "llama2c: a .bin file llama2.c's run.c reads")
    p.add_argument("--out", metavar="PATH", required=True, help="the directory or file to write")
    p.add_argument("--version", type=int, choices=(0, 1), default=0,
                   help="llama2.c format version: 0 (legacy, what run.c reads; default) or 1")


def run(args) -> int:
    from ..fileio import check_writable
    from ..pretrained import load
    out = Path(args.out)
    source = model_source(args)
    cfg = source.config
    if args.format == "llama2c":
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
