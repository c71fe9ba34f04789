"""LoRA fine-tuning side by side: anecy LoRA, anecy full fine-tuning, PyTorch + PEFT LoRA.

Each side runs in a fresh process on the same random windows of a model of the preset's
shape (random weights), full vocabulary, on the cpu backend (PyTorch on all CPUs): LoRA
with rank 8, alpha 16, all seven targets of every layer. Printed per side: the median ms
of a microstep (forward + backward of one sequence), the median ms of an update (``accum``
microsteps and the optimizer step), the process's peak RSS, and the bytes of the checkpoint
a resume needs (anecy: its checkpoint file; PEFT: adapter_model.safetensors plus the
optimizer's state as torch.save writes it, what HF's Trainer keeps beside an adapter).

    python bench/bench_lora.py                                 # stories110m and qwen3-0.6b
    python bench/bench_lora.py --preset stories110m --updates 2
    python bench/bench_lora.py --quick                         # tiny config (CI smoke run)
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIDES = ("anecy LoRA", "anecy full", "PyTorch+PEFT LoRA")
RANK, ALPHA = 8, 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def config_for(preset, seq_len):
    from anecy.config import ModelConfig
    cfg = ModelConfig.preset(preset)
    if seq_len:
        cfg.seq_len = seq_len
    return cfg


def windows(cfg, n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w = rng.integers(0, cfg.vocab_size, cfg.seq_len + 1).astype(np.int32)
        out.append((w[:-1], w[1:]))
    return out


def own_peak_rss_bytes():
    """This process's own high-water mark (Linux keeps ru_maxrss across exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


class AnecySide:
    def __init__(self, cfg, lora, accum, workdir):
        from anecy import Model
        from anecy.config import TrainConfig
        from anecy.lora import LoraAdapters, LoraConfig
        from anecy.optimizer import Optimizer
        adapters = LoraAdapters(cfg, LoraConfig(rank=RANK, alpha=ALPHA)) if lora else None
        self.model = Model(cfg, "cpu", seed=0, adapters=adapters)
        self.tc = TrainConfig(steps=10 ** 6, accum=accum, lr=1e-4, warmup=0, loss_scale=1.0,
                              weight_decay=0.0 if lora else 0.1)
        self.opt = Optimizer(self.model, self.tc, "cpu")
        self.lora, self.workdir = lora, Path(workdir)
        self.step_count = 0

    def microstep(self, x, y):
        self.model.forward_backward(x, y)
        self.step_count += 1

    def update(self, accum):
        self.opt.update(accum, self.step_count)

    def checkpoint_bytes(self):
        from anecy.checkpoint import save_checkpoint
        from anecy.lora import base_hash, save_lora_checkpoint
        path = self.workdir / "side.ckpt"
        state = {"step": self.step_count, "loss_scale": 1.0}
        if self.lora:
            save_lora_checkpoint(path, self.model.adapters,
                                 {"path": "base", "hash": base_hash(self.model)},
                                 self.opt.m, self.opt.v, state, fsync=False)
        else:
            save_checkpoint(path, {"kind": "anecy-train", **state},
                            {"params": self.model.params, "adam_m": self.opt.m,
                             "adam_v": self.opt.v}, fsync=False)
        return path.stat().st_size


class PeftSide:
    def __init__(self, cfg, accum, workdir):
        import peft
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM
        self.torch = torch
        torch.set_num_threads(os.cpu_count())
        common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim,
                      intermediate_size=cfg.hidden_dim, num_hidden_layers=cfg.n_layers,
                      num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                      head_dim=cfg.head_dim, max_position_embeddings=cfg.seq_len,
                      rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                      tie_word_embeddings=cfg.tie_embeddings)
        base = (Qwen3ForCausalLM(Qwen3Config(**common)) if cfg.qk_norm
                else LlamaForCausalLM(LlamaConfig(**common))).float()
        self.model = peft.get_peft_model(base, peft.LoraConfig(
            r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), lora_dropout=0.0,
            task_type="CAUSAL_LM")).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
        self.workdir = Path(workdir)

    def microstep(self, x, y):
        torch = self.torch
        logits = self.model(torch.from_numpy(x[None].astype(np.int64))).logits[0]
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y.astype(np.int64)))
        loss.backward()

    def update(self, accum):
        for p in self.params:
            p.grad /= accum
        self.torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=False)

    def checkpoint_bytes(self):
        out = self.workdir / "peft"
        self.model.save_pretrained(out)
        self.torch.save(self.opt.state_dict(), out / "optimizer.pt")
        return sum(f.stat().st_size for f in out.iterdir()
                   if f.name in ("adapter_model.safetensors", "optimizer.pt"))


def side_child(side, preset, seq_len, accum, updates, warmup):
    """Run one side in this (fresh) process: its figures as a dict."""
    cfg = config_for(preset, seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        if side == "PyTorch+PEFT LoRA":
            runner = PeftSide(cfg, accum, tmp)
        else:
            runner = AnecySide(cfg, side == "anecy LoRA", accum, tmp)
        wins = windows(cfg, warmup + accum * updates)
        micro, upd = [], []
        for x, y in wins[:warmup]:
            runner.microstep(x, y)
        runner.update(warmup)
        if isinstance(runner, AnecySide):
            runner.model.engine.reset_timers()
        for u in range(updates):
            t_upd = time.perf_counter()
            for x, y in wins[warmup + u * accum:warmup + (u + 1) * accum]:
                t = time.perf_counter()
                runner.microstep(x, y)
                micro.append((time.perf_counter() - t) * 1e3)
            runner.update(accum)
            upd.append((time.perf_counter() - t_upd) * 1e3)
        # anecy: where a microstep's time went (Engine.timings, ms per microstep)
        parts = ({k: v / len(micro) for k, v in runner.model.timings().items()}
                 if isinstance(runner, AnecySide) else None)
        ckpt = runner.checkpoint_bytes()
    return {"microstep_ms": statistics.median(micro), "update_ms": statistics.median(upd),
            "rss_bytes": own_peak_rss_bytes(), "ckpt_bytes": ckpt, "parts": parts}


def run_side(side, preset, seq_len, accum, updates, warmup):
    code = ("import sys, json; sys.argv=['x']; "
            f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            "import bench_lora as b; "
            f"print(json.dumps(b.side_child({side!r}, {preset!r}, {seq_len}, {accum}, "
            f"{updates}, {warmup})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{side} on {preset} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", action="append",
                    help="model preset (repeatable); default: stories110m and qwen3-0.6b")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--accum", type=int, default=10, help="microsteps per update")
    ap.add_argument("--updates", type=int, default=1, help="timed updates per side")
    ap.add_argument("--warmup", type=int, default=1, help="untimed microsteps first")
    ap.add_argument("--quick", action="store_true", help="tiny config, seq 32 (smoke test)")
    args = ap.parse_args()
    if args.quick:
        presets, args.seq_len, args.accum, args.updates = ["tiny"], 32, 2, 1
    else:
        presets = args.preset or ["stories110m", "qwen3-0.6b"]
    print(f"LoRA R {RANK} alpha {ALPHA}, all seven targets, all layers; full vocabulary; "
          f"seq {args.seq_len}; accum {args.accum}; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at start; a fresh process per side")
    for preset in presets:
        res = {s: run_side(s, preset, args.seq_len, args.accum, args.updates, args.warmup)
               for s in SIDES}
        print(f"\n{preset}")
        print(f"  {'side':<20}{'ms/microstep':>14}{'ms/update':>12}{'peak RSS GiB':>14}"
              f"{'checkpoint MB':>15}")
        for s in SIDES:
            r = res[s]
            print(f"  {s:<20}{r['microstep_ms']:>14.1f}{r['update_ms']:>12.1f}"
                  f"{r['rss_bytes'] / 2 ** 30:>14.2f}{r['ckpt_bytes'] / 1e6:>15.2f}")
        for s in SIDES[:2]:
            print(f"  {s} ms per microstep by part: " + ", ".join(
                f"{k} {v:.0f}" for k, v in res[s]["parts"].items() if v >= 0.5))
        lo, full, pt = (res[s] for s in SIDES)
        print(f"  LoRA microstep / PyTorch+PEFT: {lo['microstep_ms'] / pt['microstep_ms']:.2f} "
              "(target <= 0.5)")
        print(f"  LoRA update / anecy full:      {lo['update_ms'] / full['update_ms']:.2f} "
              "(target <= 0.7)")
        print(f"  LoRA peak RSS / anecy full:    {lo['rss_bytes'] / full['rss_bytes']:.2f} "
              "(target <= 0.35 for qwen3-0.6b)")
        print(f"  LoRA checkpoint / anecy full:  {lo['ckpt_bytes'] / full['ckpt_bytes']:.4f}")


if __name__ == "__main__":
    main()
