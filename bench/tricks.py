"""What each speed trick buys (nanotune/tricks.py lists them): all on, all off (--plain), each off alone.

    python bench/tricks.py [--quick] [--rounds N]

Three tables, on the GPT-2 124M architecture (random weights, Hub layout):
- a training step, 8 x 128 tokens, fp32 and bf16 autocast: tokens/s and peak resident memory;
- decoding with sampling (top-k 50, temperature 0.8), 64 new tokens after a 16-token prompt,
  batch 1 and batch 8, fp32 and bf16 weights: new tokens/s and peak memory;
- a 4-bit load: seconds and peak memory.
Each configuration runs in its own process (the malloc setting and the peak memory are per
process); the configurations take turns for `--rounds` rounds and each one's best round counts,
so a slow spell of the machine hits all of them alike. The machine's measured matmul peak is
printed with the tables: ratios taken in a slow spell can hide or inflate a fixed per-step cost.
"""
import argparse
import json
import subprocess
import sys
import time

import torch
from common import checkpoint, matmul_peak, peak_rss_mib, report, reset_peak_rss

TABLES = {   # the tricks that act in each job
    "train": ("dropout_mask", "attention", "chunked_loss", "keep_freed_memory"),
    "decode": ("kv_cache", "packed_weights", "fast_sampling", "attention", "keep_freed_memory"),
    "load": ("quantize_in_pieces",),
}


def configurations(job):
    """(label, tricks turned off): all on, each off alone, all off."""
    return [("all tricks on", [])] + [(f"{name} off", [name]) for name in TABLES[job]] + [("all off (--plain)", ["all"])]


def train_worker(folder, dtype, steps):
    import train
    from nanotune import GPT2
    from nanotune.optim import make_optimizer
    model = GPT2.from_pretrained(folder).train()
    optimizer = make_optimizer(model, 5e-5, 0.01)
    vocab = model.config.vocab_size
    data = [torch.randint(0, vocab, (8, 128), generator=torch.Generator().manual_seed(i)) for i in range(steps)]
    times = []
    for ids in data:               # train.py's own step
        batch = {"input_ids": ids, "attention_mask": None, "labels": ids}
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            train.train_step(model, [batch], optimizer, 5e-5, "lm", 1.0, torch.device("cpu"))
        times.append(time.perf_counter() - start)
    steady = times[2:]             # the first steps warm up the allocator and the kernels
    return {"per_s": 8 * 128 * len(steady) / sum(steady)}


def decode_worker(folder, batch, dtype, new_tokens):
    from nanotune import GPT2
    from nanotune.generation import generate
    model = GPT2.from_pretrained(folder, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    prompts = torch.randint(0, 50000, (batch, 16), generator=torch.Generator().manual_seed(batch)).tolist()
    run = lambda n: generate(model, prompts, n, 50256, None, temperature=0.8, top_k=50, generator=torch.Generator().manual_seed(0))
    run(2)                                        # warm up
    start = time.perf_counter()
    run(new_tokens)
    return {"per_s": batch * new_tokens / (time.perf_counter() - start)}


def load_worker(folder):
    from nanotune import GPT2
    from nanotune.quantize import QuantConfig, _bitsandbytes
    _bitsandbytes()
    reset_peak_rss()
    start = time.perf_counter()
    GPT2.from_pretrained(folder, quantize=QuantConfig("4bit"))
    return {"seconds": time.perf_counter() - start}


def worker(job, off, size, setting, quick):
    from nanotune import tricks
    if off:
        tricks.turn_off(None if off == ["all"] else off)
    if tricks.enabled("keep_freed_memory"):
        tricks.keep_freed_memory()                # as train.py and generate.py do on CPU
    folder = checkpoint(size)
    if job == "train":
        result = train_worker(folder, setting, 4 if quick else 6)
    elif job == "decode":
        batch, dtype = setting.split()
        result = decode_worker(folder, int(batch), dtype, 8 if quick else 64)
    else:
        result = load_worker(folder)
    print(json.dumps(result | {"peak_rss_mib": peak_rss_mib()}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="tiny model, fewer steps and tokens")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--jobs", nargs="+", choices=list(TABLES), default=list(TABLES), help="which tables to measure")
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    size = "tiny" if args.quick else "124M"
    if args.worker:
        job, off, size, setting = args.worker
        return worker(job, json.loads(off), size, setting, args.quick)
    checkpoint(size)
    peaks = {"fp32": matmul_peak(torch.float32) / 1e9, "bf16": matmul_peak(torch.bfloat16) / 1e9}
    jobs = [(job, setting) for job, setting in (("train", "fp32"), ("train", "bf16"), ("decode", "1 fp32"), ("decode", "8 fp32"),
                                                 ("decode", "1 bf16"), ("decode", "8 bf16"), ("load", "4bit")) if job in args.jobs]
    best = {}
    for _ in range(args.rounds):
        for job, setting in jobs:
            for label, off in configurations(job):
                cmd = [sys.executable, __file__, "--worker", job, json.dumps(off), size, setting] + (["--quick"] if args.quick else [])
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(out.stderr)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                key = (job, setting, label)
                better = r["seconds"] < best[key]["seconds"] if "seconds" in r and key in best else r.get("per_s", 0) > best.get(key, {}).get("per_s", -1)
                if key not in best or better:
                    best[key] = r
                print(key, r, flush=True)
    peak_note = f"matmul peak in this run: fp32 {peaks['fp32']:,.0f} GFLOP/s, bf16 {peaks['bf16']:,.0f} GFLOP/s"
    for job, unit, settings in (("train", "tokens/s", ("fp32", "bf16")), ("decode", "new tokens/s", ("1 fp32", "8 fp32", "1 bf16", "8 bf16"))):
        if job not in args.jobs:
            continue
        rows = []
        for setting in settings:
            on = best[job, setting, "all tricks on"]["per_s"]
            for label, _ in configurations(job):
                r = best[job, setting, label]
                rows.append([setting if job == "train" else "batch {}, {}".format(*setting.split()), label, r["per_s"], r["peak_rss_mib"], f"{r['per_s'] / on:.2f}x"])
        title = "Training step, GPT-2 %s, 8 x 128 tokens" % size if job == "train" else "Decoding with sampling, GPT-2 %s, 16 + %d tokens" % (size, 8 if args.quick else 64)
        report(title, ["", "tricks", unit, "peak RSS MiB", "speed vs all on"], rows, {"matmul_peak_gflops": peaks})
    if "load" in args.jobs:
        rows = [["4-bit load", label, f'{best["load", "4bit", label]["seconds"]:.2f}', best["load", "4bit", label]["peak_rss_mib"]]
                for label, _ in configurations("load")]
        report(f"Loading GPT-2 {size} in 4 bits", ["", "tricks", "seconds", "peak RSS MiB"], rows, {"matmul_peak_gflops": peaks})
    print(f"\n{peak_note}")


if __name__ == "__main__":
    main()
