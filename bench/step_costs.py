"""A training step taken apart: what each of train.train_step's parts costs, beside its matrix products.

    python bench/step_costs.py [--batch 8] [--seq 42] [--steps 8] [--plain TRICKS]

GPT-2 124M architecture at the main command's shapes (8 texts x 42 tokens by default), in fp32
and, where the CPU multiplies bf16 natively, bf16 autocast. The step is train.py's own
(`train.loss_sum` under the run's autocast, backward, clipping, AdamW, zeroing), run once per
part with a clock between the parts; each part's median over the steps counts. Beside them, the
step's matrix products alone (train_speed.matmul_floor) and what the step's fixed costs must move
through memory: AdamW reads the weights, gradients and two moments and writes three of them back.
"""
import argparse
import contextlib
import json
import statistics
import time

import torch
from common import checkpoint, matmul_peak, memory_bandwidth, native_bf16, report
from train_speed import matmul_floor

import nanotune
import train
from nanotune.models import load_model
from nanotune.optim import make_optimizer
from nanotune import tricks
from nanotune.tricks import keep_freed_memory


def parts_of_steps(model, optimizer, batches, bf16, config):
    """{part: [seconds of each step]} of train.train_step's parts, run one after another."""
    times = {"forward and loss": [], "backward": [], "clipping (the norm; and scaling, if --plain clip_in_adamw)": [],
             "AdamW": [], "zeroing": [], "whole step": [], "the step's matrix products alone": []}
    params = [p for p in model.parameters() if p.requires_grad]
    dtype = torch.bfloat16 if bf16 else torch.float32
    for batch in batches:
        clock = [time.perf_counter()]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            summed = train.loss_sum(model, batch, "lm")
        clock.append(time.perf_counter())
        (summed / batch["labels"].numel()).backward()
        clock.append(time.perf_counter())
        grads = [p for p in params if p.grad is not None]
        if tricks.enabled("clip_in_adamw") and tricks.clips_inside_adamw(optimizer):
            norm = torch.nn.utils.get_total_norm([p.grad for p in grads])       # tricks.clip_inside_adamw,
            clock.append(time.perf_counter())                                   # a clock between its halves
            optimizer.grad_scale = 1 / torch.clamp(1.0 / (norm + 1e-6), max=1.0)
            optimizer.step()
            del optimizer.grad_scale
        else:
            torch.nn.utils.clip_grad_norm_(grads, 1.0)
            clock.append(time.perf_counter())
            optimizer.step()
        clock.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        clock.append(time.perf_counter())
        for part, a, b in zip(times, clock, clock[1:]):
            times[part].append(b - a)
        times["whole step"].append(clock[-1] - clock[0])
        # the floor measured between the steps, not once apart: the machine's speed drifts within minutes
        B, T = batch["input_ids"].shape
        times["the step's matrix products alone"].append(matmul_floor(config, B, T, dtype, repeat=1))
    return times


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=42)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--plain", default="", help="tricks to turn off, as train.py --plain takes them")
    args = p.parse_args()
    keep_freed_memory()                     # as train.py does on CPU
    folder = checkpoint("124M")
    model = load_model(folder).train()
    config = json.loads((folder / "config.json").read_text())
    optimizer = make_optimizer(model, 5e-5, 0.01)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
               for ids in (torch.randint(0, 50257, (args.batch, args.seq), generator=g) for _ in range(args.steps + 2))]
    n = sum(p.numel() for p in model.parameters())
    bandwidth = memory_bandwidth()
    print(f"GPT-2 124M, {args.batch} x {args.seq} tokens; memory bandwidth {bandwidth / 1e9:.1f} GB/s;"
          f" AdamW moves {7 * 4 * n / 1e9:.2f} GB a step: {7 * 4 * n / bandwidth:.3f} s at that bandwidth")
    for bf16 in ([False, True] if native_bf16() else [False]):
        dtype = torch.bfloat16 if bf16 else torch.float32
        peak = matmul_peak(dtype)
        with nanotune.plain(args.plain.split(",")) if args.plain else contextlib.nullcontext():
            times = parts_of_steps(model, optimizer, batches, bf16, config)
        median = {part: statistics.median(t[2:]) for part, t in times.items()}   # the first two warm up
        floor = median["the step's matrix products alone"]
        rows = [[part, 1000 * s, f"{s / median['whole step']:.0%}"] for part, s in median.items()]
        report(f"GPT-2 124M step at {args.batch} x {args.seq}, {'bf16 autocast' if bf16 else 'fp32'}"
               f"{', --plain ' + args.plain if args.plain else ''}; matmul peak {peak / 1e9:,.0f} GFLOP/s",
               ["part", "ms", "share of the step"], rows,
               {"products_alone_share": floor / median["whole step"], "peak_gflops": peak / 1e9})


if __name__ == "__main__":
    main()
