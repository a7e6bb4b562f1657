"""Scaling: training tokens/s and peak memory as the model and the sequence length grow.

    python bench/scaling.py [--quick] [--sizes 124M 355M]

GPT-2 tiny -> 124M -> 355M architectures, sequences of 128 -> 512 -> 1024 tokens (2,048 tokens a
step: batch 16, 4, 2), fp32, with and without gradient checkpointing; nanotune's step against a
plain loop over `transformers` GPT2LMHeadModel (the same steps as bench/train_speed.py). Each
point runs in its own process, so that its peak resident memory is its own. --quick: tiny only,
128 and 512 tokens. A point whose process dies (out of memory, on a small machine) is reported as
such and the script goes on.
"""
import argparse
import json
import subprocess
import sys

from common import checkpoint, peak_rss_mib, report
from train_speed import batches, run_nanotune, run_plain_loop

TOKENS_PER_STEP = 2048
STEPS = 3          # the first one warms up allocators and kernels and is not counted


def worker(impl, size, T, checkpointing):
    folder = checkpoint(size)
    config = json.loads((folder / "config.json").read_text())
    data = batches(STEPS, TOKENS_PER_STEP // T, T, config["vocab_size"])
    run = {"nanotune": run_nanotune, "reference": run_plain_loop}[impl]
    _, times = run(folder, data, False, checkpointing=checkpointing)
    print(json.dumps({"tokens_per_s": TOKENS_PER_STEP * (STEPS - 1) / sum(times[1:]), "peak_rss_mib": peak_rss_mib()}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sizes", nargs="+", choices=["tiny", "124M", "355M"], help="only these model sizes")
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        impl, size, T, checkpointing = args.worker
        return worker(impl, size, int(T), checkpointing == "1")
    sizes, lengths = (["tiny"], [128, 512]) if args.quick else (["tiny", "124M", "355M"], [128, 512, 1024])
    sizes = args.sizes or sizes
    rows = []
    for size in sizes:
        for T in lengths:
            for checkpointing in (False, True):
                r = {}
                for impl in ("reference", "nanotune"):
                    out = subprocess.run([sys.executable, __file__, "--worker", impl, size, str(T), str(int(checkpointing))],
                                         capture_output=True, text=True)
                    if out.returncode:
                        print(f"{size} {T} tokens, {impl}: the process died (exit status {out.returncode}), most likely out of memory;"
                              f" {out.stderr.strip()[-300:]}", flush=True)
                        break
                    r[impl] = json.loads(out.stdout.strip().splitlines()[-1])
                if len(r) < 2:
                    continue
                ref, ours = r["reference"], r["nanotune"]
                rows.append([size, f"{TOKENS_PER_STEP // T} x {T}", "yes" if checkpointing else "no",
                             ref["tokens_per_s"], ours["tokens_per_s"], f"{ours['tokens_per_s'] / ref['tokens_per_s']:.2f}x",
                             ref["peak_rss_mib"], ours["peak_rss_mib"], f"{ours['peak_rss_mib'] / ref['peak_rss_mib']:.2f}x"])
                print(rows[-1], flush=True)
    report("Scaling, fp32 training, nanotune vs a plain loop over GPT2LMHeadModel",
           ["model", "batch x tokens", "grad checkpointing", "reference tok/s", "nanotune tok/s", "speed ratio",
            "reference peak MiB", "nanotune peak MiB", "memory ratio"], rows)


if __name__ == "__main__":
    main()
