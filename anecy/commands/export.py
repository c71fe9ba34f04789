"""anecy export: write a model as a Hugging Face directory or a llama2.c .bin file."""

from pathlib import Path

HELP = "write a checkpoint's model as a Hugging Face directory or a llama2.c .bin file"


def add_arguments(p):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", metavar="PATH", help="an anecy training checkpoint")
    src.add_argument("--init-from", metavar="PATH",
                     help="or convert pretrained weights: a llama2.c .bin or an HF directory")
    p.add_argument("--format", choices=("hf", "llama2c"), required=True,
                   help="hf: a directory transformers loads (config.json + model.safetensors); "
                        "llama2c: a .bin file llama2.c's run.c reads")
    p.add_argument("--out", metavar="PATH", required=True, help="the directory or file to write")
    p.add_argument("--version", type=int, choices=(0, 1),
                   help="llama2.c format version: 0 (legacy, what run.c reads; default) or 1; "
                        "for --format llama2c only")


def run(args) -> int:
    from ..errors import AnecyError
    if args.version is not None and args.format != "llama2c":
        raise AnecyError(f"--version is the llama2.c format's; it does not apply to "
                         f"--format {args.format}")
    from ..fileio import check_writable
    from ..pretrained import inspect, load
    out = Path(args.out)
    source = inspect(args.ckpt, "checkpoint") if args.ckpt else inspect(args.init_from, "init")
    cfg = source.config
    # the weights read: the file, or an HF directory's files (an export must not land on them)
    inputs = [source.path] + (sorted(source.path.iterdir()) if source.path.is_dir() else [])
    if args.format == "llama2c":
        from ..llama2c import check_exportable, save
        check_exportable(cfg)
        check_writable(out, what="llama2.c file", inputs=inputs)
        save(load(source), out, version=args.version or 0, seq_len=cfg.seq_len)
    else:
        from ..hf import config_to_hf, save_pretrained
        config_to_hf(cfg)
        for name in ("config.json", "model.safetensors"):
            check_writable(out / name, what="HF model file", make_parents=True, inputs=inputs)
        save_pretrained(load(source), out)
    print(f"wrote {out} ({args.format}) from {source.describe}")
    return 0
