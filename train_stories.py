#!/usr/bin/env python3
"""Train a Stories model (llama2.c's Llama-2-shaped models, Llama-2 vocabulary).

    python train_stories.py --steps 100
    python train_stories.py --preset tiny --steps 20 --ckpt-every 10
    python train_stories.py --resume
"""
import sys

from anecy.cli import main

if __name__ == "__main__":
    sys.exit(main(family="stories"))
