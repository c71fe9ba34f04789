"""anecy plot: training curves from metrics files."""

from ._args import non_negative_int

HELP = "plot loss, held-out loss, learning rate and tokens/s from metrics files"


def add_arguments(p):
    p.add_argument("metrics", nargs="+", metavar="METRICS.jsonl",
                   help="files written by `anecy train --metrics`; several runs are overlaid")
    p.add_argument("-o", "--out", default="plot.png", metavar="PATH",
                   help="image to write: .png, .svg or .pdf (default plot.png)")
    p.add_argument("--tokens", action="store_true",
                   help="x axis: tokens trained on, log-scaled (default: steps)")
    p.add_argument("--smooth", type=non_negative_int, default=20, metavar="N",
                   help="draw the training loss also as a mean over N steps (default 20; "
                        "0 or 1 for the raw loss only)")
    p.add_argument("--title", help="a title over the plots")


def run(args) -> int:
    from ..plot import plot
    plot(args.metrics, args.out, tokens_axis=args.tokens, window=args.smooth, title=args.title)
    print(f"wrote {args.out}")
    return 0
