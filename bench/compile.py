"""torch.compile on nanotune's training step: what it costs at start-up and what a step gains.

    python bench/compile.py [--steps 8] [--rounds 2]

GPT-2 (124M architecture), batches of 8 x 128 tokens, fp32 and bf16 autocast. "eager" is
train.py's step, tricks on. "compiled" compiles each transformer block with torch.compile
(inductor, static shapes), with the two tricks whose custom autograd functions break the graph
(attention, dropout_mask) off: inductor gets the textbook formulas and fuses them itself. The
output layer's chunked loss stays eager. Each run is a process of its own, the two take turns,
and each one's best round counts; the first step's time includes compiling from cold (inductor's
on-disk caches off, as on a user's first run).
"""
import argparse
import json
import os
import subprocess
import sys

import torch
from common import checkpoint, matmul_peak, report
from train_speed import batches, timed_steps


def worker(mode, bf16, steps, batch=8, T=128):
    from nanotune import GPT2, tricks
    from nanotune.hub import own_memory
    from nanotune.optim import make_optimizer
    tricks.keep_freed_memory()
    if mode == "compiled":
        tricks.turn_off(["attention", "dropout_mask"])
    model = GPT2.from_pretrained(checkpoint("124M")).train()
    own_memory(model.parameters())
    if mode == "compiled":
        for block in model.transformer.h:
            block.compile(dynamic=False)

    def loss_of(ids):
        total, count = tricks.output_layer_lm_loss_sum(model(ids, output_layer=False), model.lm_head.weight, ids)
        return total / count
    _, times = timed_steps(model, make_optimizer(model, 5e-5, 0.0), batches(steps, batch, T, model.config.vocab_size), bf16, loss_of)
    print(json.dumps({"first_step_s": times[0], "tokens_per_s": batch * T / min(times[2:])}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--worker", nargs=2, metavar=("MODE", "BF16"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker[0], args.worker[1] == "1", args.steps)
    peaks = {False: matmul_peak(torch.float32) / 1e9, True: matmul_peak(torch.bfloat16) / 1e9}
    rows = []
    for bf16 in (False, True):
        best = {}
        for _ in range(args.rounds):
            for mode in ("eager", "compiled"):
                out = subprocess.run([sys.executable, __file__, "--worker", mode, str(int(bf16)), "--steps", str(args.steps)],
                                     capture_output=True, text=True, env=os.environ | {"TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"})
                if out.returncode:
                    raise SystemExit(out.stderr[-3000:])
                r = json.loads(out.stdout.strip().splitlines()[-1])
                if r["tokens_per_s"] > best.get(mode, {"tokens_per_s": 0})["tokens_per_s"]:
                    best[mode] = r
        for mode in ("eager", "compiled"):
            rows.append(["bf16" if bf16 else "fp32", mode, best[mode]["tokens_per_s"], best[mode]["first_step_s"],
                         f"{best[mode]['tokens_per_s'] / best['eager']['tokens_per_s']:.2f}x"])
            print(rows[-1], flush=True)
    report(f"torch.compile: GPT-2 124M training step, 8 x 128 tokens; matmul peak fp32 {peaks[False]:.0f}, bf16 {peaks[True]:.0f} GFLOP/s",
           ["precision", "step", "tokens/s (best step)", "first step (s)", "vs eager"], rows)


if __name__ == "__main__":
    main()
