"""anecy export: write a model as a Hugging Face directory, a llama2.c .bin file or a GGUF file
(llama.cpp, Ollama), or LoRA adapters as a PEFT directory."""

import sys
from pathlib import Path

from ..errors import AnecyError
from ._args import add_model_source, model_source

HELP = ("write a checkpoint's model as a Hugging Face directory, a llama2.c .bin file or a GGUF "
        "file, or its LoRA adapters as a PEFT directory")


def add_arguments(p):
    add_model_source(p, "or convert pretrained weights: a llama2.c .bin or an HF directory")
    p.add_argument("--adapter", metavar="DIR",
                   help="a PEFT LoRA adapter directory (adapter_config.json + "
                        "adapter_model.safetensors) for the model given: fused into it for "
                        "hf, llama2c and gguf, written again (checked) for peft")
    p.add_argument("--format", choices=("hf", "llama2c", "gguf", "peft"), required=True,
                   help="hf: a directory transformers loads (config.json + model.safetensors); "
                        "llama2c: a .bin file llama2.c's run.c reads; gguf: one file with the "
                        "tokenizer, what llama.cpp and Ollama run; peft: the LoRA adapters "
                        "as a directory PEFT's PeftModel.from_pretrained loads")
    p.add_argument("--out", metavar="PATH", required=True, help="the directory or file to write")
    p.add_argument("--version", type=int, choices=(0, 1),
                   help="llama2.c format version: 0 (legacy, what run.c reads; default) or 1; "
                        "for --format llama2c only")
    p.add_argument("--dtype", choices=("f32", "f16", "q8_0"),
                   help="GGUF tensor type (default f32); norm weights always stay f32")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="GGUF: the tokenizer to put in the file, tokenizer.model, llama2.c's "
                        "tokenizer.bin, tokenizer.json or an HF directory (default: the one the "
                        "checkpoint's data was prepared with, or the HF directory's own)")


def run(args) -> int:
    if args.version is not None and args.format != "llama2c":
        raise AnecyError(f"--version is the llama2.c format's; it does not apply to "
                         f"--format {args.format}")
    from ..fileio import check_writable
    from ..pretrained import load, tokenizer_for
    out = Path(args.out)
    if args.format != "gguf" and (args.dtype or args.tokenizer):
        raise AnecyError(f"--{'dtype' if args.dtype else 'tokenizer'} applies to --format gguf "
                         "only")
    source = model_source(args)
    cfg = source.config
    # the weights read: the file, or an HF directory's files (an export must not land on them)
    inputs = [source.path] + (sorted(source.path.iterdir()) if source.path.is_dir() else [])
    adapters = None
    if args.adapter:
        from ..lora import read_peft
        if source.kind == "lora":
            raise AnecyError(f"{source.path} holds adapters already; --adapter goes with a "
                             "base model")
        adapters = read_peft(args.adapter, cfg)   # checked before anything is loaded
        adapter_dir = Path(args.adapter)
        inputs += sorted(adapter_dir.iterdir()) if adapter_dir.is_dir() else []
    if args.format == "peft":
        from ..lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_lora_checkpoint, save_peft
        if source.kind == "lora":
            meta, adapters, _ = load_lora_checkpoint(source.path)
            base_name = meta["base"]["path"]
        elif adapters is None:
            raise AnecyError("--format peft writes LoRA adapters: give a LoRA checkpoint "
                             "(--ckpt) or a base model and --adapter DIR")
        else:
            base_name = str(source.path)
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            check_writable(out / name, what="PEFT adapter file", make_parents=True,
                           inputs=inputs)
        save_peft(out, adapters, base_name)
        print(f"wrote {out} (peft) from {source.describe}")
        return 0
    if args.format == "gguf":
        from ..gguf_export import check_exportable, check_tokenizer
        check_exportable(cfg)
        tok = tokenizer_for(source, args.tokenizer)
        if tok is None:
            raise AnecyError(f"no tokenizer known for {source.describe}, and a GGUF file holds "
                             "its tokenizer: name one with --tokenizer")
        check_tokenizer(tok, cfg.vocab_size)
        check_writable(out, what="GGUF file", inputs=inputs + [Path(tok.path)])
    elif args.format == "llama2c":
        from ..llama2c import check_exportable, save
        check_exportable(cfg)
        check_writable(out, what="llama2.c file", inputs=inputs)
    else:
        from ..hf import config_to_hf
        config_to_hf(cfg)
        for name in ("config.json", "model.safetensors"):
            check_writable(out / name, what="HF model file", make_parents=True, inputs=inputs)
    model = load(source)
    if adapters is not None:
        from ..lora import fuse
        fuse(model, adapters, inplace=True)
    if args.format == "gguf":
        from ..gguf_export import save as save_gguf
        save_gguf(model, out, tok, dtype=args.dtype or "f32", context_length=cfg.seq_len,
                  name=source.path.stem, progress=sys.stderr.isatty())
    elif args.format == "llama2c":
        save(model, out, version=args.version or 0, seq_len=cfg.seq_len)
    else:
        from ..hf import save_pretrained
        save_pretrained(model, out)
    fused = f" with {args.adapter} fused" if adapters is not None else ""
    print(f"wrote {out} ({args.format}) from {source.describe}{fused}")
    return 0
