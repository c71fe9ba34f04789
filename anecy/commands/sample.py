"""anecy sample: generate text from a trained checkpoint, a llama2.c .bin or an HF directory."""

import argparse
import sys
import time

from ..errors import AnecyError
from ._args import add_model_source, model_source, non_negative_int, number, positive_int

HELP = "generate text from a checkpoint, a llama2.c .bin file or a Hugging Face directory"


def add_arguments(p):
    add_source_arguments(p)
    p.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer.model, llama2.c's tokenizer.bin, tokenizer.json or an HF "
                        "directory (default: the one the checkpoint's data was prepared with, "
                        "or the HF directory's own)")
    p.add_argument("--prompt", default="", help="text to continue (default: none, from BOS)")
    p.add_argument("--max-new-tokens", type=non_negative_int, default=256, metavar="N",
                   help="tokens to generate at most (default 256; fewer at BOS/EOS or at the "
                        "end of the model's context)")
    add_sampling_arguments(p)
    add_decoder_arguments(p)


def add_source_arguments(p):
    """--ckpt or --init-from, and --adapter: the model (anecy sample's and anecy chat's)."""
    add_model_source(p, "pretrained weights: a llama2.c .bin file (e.g. stories110M.bin) or a "
                        "Hugging Face directory (config.json + model.safetensors)")
    p.add_argument("--adapter", metavar="DIR",
                   help="a PEFT LoRA adapter directory (adapter_config.json + "
                        "adapter_model.safetensors): the model with it fused")


def source_and_adapters(args):
    """The model source --ckpt/--init-from names and the PEFT adapters of --adapter (None),
    checked before any weights are loaded."""
    source = model_source(args)
    if not args.adapter:
        return source, None
    from ..lora import read_peft
    if source.kind == "lora":
        raise AnecyError(f"{source.path} holds adapters already; --adapter goes with a "
                         "base model")
    return source, read_peft(args.adapter, source.config)


def load_model(source, adapters):
    """The model of ``source`` with ``adapters`` (or None) fused."""
    from ..pretrained import load
    model = load(source)
    if adapters is not None:
        from ..lora import fuse
        fuse(model, adapters, inplace=True)
    return model


def add_sampling_arguments(p):
    """--temperature, --top-p, --top-k and --seed (anecy sample's and anecy chat's)."""
    p.add_argument("--temperature", type=number, default=1.0, metavar="T",
                   help="0 is greedy (default 1.0)")
    p.add_argument("--top-p", type=number, default=0.9, metavar="P",
                   help="nucleus sampling: the most likely tokens up to this mass, 1 for all "
                        "(default 0.9)")
    p.add_argument("--top-k", type=non_negative_int, default=0, metavar="K",
                   help="sample among the K most likely tokens, 0 for all (default 0)")
    p.add_argument("--seed", type=_seed, metavar="S",
                   help=f"seed of the sampler, 0 to 2^{SEED_BITS}-1 (default: a fresh one)")


def add_decoder_arguments(p):
    """--threads and --dtype: the decoder's (anecy sample's and anecy chat's)."""
    from ..config import DECODE_DTYPES, MAX_DECODE_THREADS
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="threads decoding each token (default: the cores, at most "
                        f"{MAX_DECODE_THREADS}); the text does not depend on it")
    p.add_argument("--dtype", choices=DECODE_DTYPES, default="f32",
                   help="weights the tokens decode from: f32 (default, exact) or q8 (int8 "
                        "blocks of 32 with a scale each, as llama.cpp's q8_0: faster, "
                        "approximate)")


SEED_BITS = 64   # the sampler's generator (PCG64) takes seeds of up to 64 bits as they are


def _seed(text):
    """--seed: a non-negative integer of at most SEED_BITS bits."""
    value = non_negative_int(text)
    if value >= 1 << SEED_BITS:
        raise argparse.ArgumentTypeError(f"expected a seed below 2^{SEED_BITS}, got {text!r}")
    return value


def prompt_ids(tok, prompt: str, vocab_size: int) -> list:
    """The prompt's ids, after BOS when the tokenizer has one."""
    bos = tok.bos_id is not None
    ids = tok.encode(prompt, bos=bos) if prompt else ([tok.bos_id] if bos else [])
    if not ids:
        raise AnecyError(f"tokenizer {tok.path} has no BOS token: give a --prompt")
    from ..data import first_bad_id
    bad = first_bad_id(ids, vocab_size)
    if bad is not None:
        raise AnecyError(f"the prompt has token id {bad[1]}, outside the model's vocabulary of "
                         f"{vocab_size} tokens: is {tok.path} this model's tokenizer?")
    return ids


def run(args) -> int:
    from ..generate import Decoder, SamplingConfig, generate, stream_text
    from ..pretrained import tokenizer_for
    from ..tokenizer import check_text
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed)
    check_text(args.prompt, "the prompt", from_argv=True)   # before any loading
    source, adapters = source_and_adapters(args)
    tok = tokenizer_for(source, args.tokenizer)
    if tok is None:
        raise AnecyError(f"no tokenizer known for {source.describe}: name one with --tokenizer "
                         "(for llama2.c models, its tokenizer.bin or Llama 2's tokenizer.model)")
    model = load_model(source, adapters)
    ids = prompt_ids(tok, args.prompt, model.config.vocab_size)
    context = source.config.seq_len
    if len(ids) > context:
        raise AnecyError(f"the prompt has {len(ids)} tokens, more than the model's context of "
                         f"{context}")
    decoder = Decoder(model, max_len=min(context, len(ids) + max(args.max_new_tokens, 1)),
                      threads=args.threads, dtype=args.dtype)
    stops = [i for i in (tok.bos_id, tok.eos_id) if i is not None]
    times = []

    def timed(tokens):
        for t in tokens:
            times.append(time.perf_counter())
            yield t

    tokens = timed(generate(model, ids, args.max_new_tokens, sampling, stops, decoder))
    for piece in stream_text(tok.decode, ids, tokens):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    # as llama2.c's run.c: the clock starts at the first new token (after the prompt)
    if len(times) > 1:
        rate = (len(times) - 1) / max(times[-1] - times[0], 1e-9)
        print(f"{len(times)} tokens, {rate:.1f} tokens/s", file=sys.stderr)
    else:
        print(f"{len(times)} tokens", file=sys.stderr)
    return 0
