"""The memory estimate train.py prints before a run, against the peak it measures at the end.

Each cell of the grid is one short `train.py` run (one epoch of data/anecdotes_jokes.txt packed into
rows of --max-length tokens) in a process of its own, so every peak is that run's alone. The error
is (estimate - measured) / measured; the target is within 20 %.

    python bench/memory.py                      # tiny and 124M, the whole grid (hours at 124M: each cell is a real run)
    python bench/memory.py --quick             # five cells a size, each setting varied once
"""
import argparse
import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, checkpoint, report, with_tokenizer

MODES = {"full": [], "lora": ["--lora-r", "8"], "8bit": ["--quantize", "8bit"], "4bit": ["--quantize", "4bit"]}
BATCH = {"tiny": {128: 16, 512: 8}, "124M": {128: 8, 512: 2}}   # rows per step, by sequence length


def run_cell(folder, size, precision, mode, checkpointing, seq):
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(ROOT / "train.py"), "--model", str(folder), "--data", str(ROOT / "data" / "anecdotes_jokes.txt"),
               "--pack", "--max-length", str(seq), "--batch-size", str(BATCH[size][seq]), "--epochs", "1", "--out", out,
               *MODES[mode], "--bf16" if precision == "bf16" else "--fp32", *(["--grad-checkpointing"] if checkpointing else [])]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        events = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        return next(e for e in events if e["event"] == "memory")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,124M")
    p.add_argument("--quick", action="store_true", help="five cells that still vary every setting once")
    p.add_argument("--modes", default=",".join(MODES), help=f"training modes to run, of {', '.join(MODES)}")
    args = p.parse_args()
    rows, errors = [], []
    for size in args.sizes.split(","):
        folder = with_tokenizer(checkpoint(size))
        grid = itertools.product(("fp32", "bf16"), args.modes.split(","), (False, True), (128, 512))
        if args.quick:
            grid = [("fp32", "full", False, 128), ("fp32", "full", True, 128), ("bf16", "lora", False, 512),
                    ("fp32", "8bit", True, 512), ("bf16", "4bit", False, 128)]
        for precision, mode, checkpointing, seq in grid:
            m = run_cell(folder, size, precision, mode, checkpointing, seq)
            errors.append(m["error"])
            print(json.dumps({"cell": [size, precision, mode, checkpointing, seq], **m}), file=sys.stderr, flush=True)
            rows.append([size, precision, mode, "on" if checkpointing else "off", f"{BATCH[size][seq]} x {seq}",
                         f"{m['estimated_mib']:,}", f"{m['measured_mib']:,}", f"{m['error']:+.0%}"])
            print(" | ".join(rows[-1]), flush=True)
    report("Peak memory of a training run: estimated before it starts, measured at its end (CPU: resident memory)",
           ["model", "precision", "training", "checkpointing", "batch", "estimated MiB", "measured MiB", "error"], rows,
           extra={"errors": [min(errors), max(errors)], "within_20_percent": sum(abs(e) <= 0.2 for e in errors), "cells": len(errors)})
    print(f"errors from {min(errors):+.0%} to {max(errors):+.0%}; {sum(abs(e) <= 0.2 for e in errors)} of {len(errors)} cells within 20 %")


if __name__ == "__main__":
    main()
