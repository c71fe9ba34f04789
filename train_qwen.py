#!/usr/bin/env python3
"""Train a Qwen3 model (QK-norm, GQA, half-split RoPE with theta 1e6, tied embeddings).

    python train_qwen.py --preset qwen3-tiny --steps 20
    python train_qwen.py --init-from ./Qwen3-0.6B --data tokens.bin --steps 100
    python train_qwen.py --resume
"""
import sys

from anecy.cli import main

if __name__ == "__main__":
    sys.exit(main(family="qwen"))
