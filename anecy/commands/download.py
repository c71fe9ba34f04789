"""anecy download: data sets from the Hugging Face hub, prepared for training."""

from ._args import non_negative_int, positive_int

HELP = "download TinyStories and the Llama-2 tokenizer and prepare them for training"


def add_arguments(p):
    from ..download import (
        DATASET_REPO,
        SHARDS,
        TOKENIZER_FILE,
        TOKENIZER_REPO,
        TRAIN_FILE,
        VALID_FILE,
    )
    p.add_argument("dataset", choices=("tinystories",), help="the data set")
    p.add_argument("--shards", type=positive_int, default=1, metavar="N",
                   help=f"training shards to prepare, of {SHARDS} (default 1; the whole "
                        "text is downloaded either way)")
    p.add_argument("--dir", default=".", metavar="D",
                   help="where the token files, their sidecars and tokenizer.model go "
                        "(default: the working directory); files already there are used "
                        "instead of downloading them")
    p.add_argument("--repo", default=DATASET_REPO, help=f"dataset repository ({DATASET_REPO})")
    p.add_argument("--train-file", default=TRAIN_FILE, help=f"training text ({TRAIN_FILE})")
    p.add_argument("--valid-file", default=VALID_FILE, help=f"validation text ({VALID_FILE})")
    p.add_argument("--tokenizer-repo", default=TOKENIZER_REPO,
                   help=f"model repository with Llama 2's tokenizer ({TOKENIZER_REPO})")
    p.add_argument("--tokenizer-file", default=TOKENIZER_FILE,
                   help=f"the tokenizer's file in it ({TOKENIZER_FILE})")
    p.add_argument("--force", action="store_true", help="prepare again files already prepared")
    p.add_argument("--workers", type=non_negative_int, default=0, metavar="N",
                   help="tokenizer processes, at most one per core (default 0: one per core)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from ..download import tinystories
    shards = tinystories(args.dir, shards=args.shards, repo=args.repo,
                         train_file=args.train_file, valid_file=args.valid_file,
                         tokenizer_repo=args.tokenizer_repo, tokenizer_file=args.tokenizer_file,
                         force=args.force, workers=args.workers or None,
                         progress=not args.no_progress)
    first = shards[0]
    print(f"ready: train with --data {first}" + (" (the default file name in this directory)"
                                                  if str(first) == first.name else ""))
    return 0
