"""LoRA and QLoRA: load memory and training speed, nanotune vs `peft` + `bitsandbytes` + `transformers`.

    python bench/qlora.py [--quick]

GPT-2 124M architecture, batch 8 x 128, LoRA r 8 (alpha 16) on c_attn, c_proj, c_fc; fp32 full
fine-tuning for comparison. Each (implementation, mode) runs in its own process, so that peak
resident memory (VmHWM) is its own: once right after loading, once after the training steps.
"""
import argparse
import json
import subprocess
import sys
import time

import torch
from common import checkpoint, peak_rss_mib, report, reset_peak_rss

MODES = ["fp32 full", "fp32 LoRA", "8-bit LoRA", "4-bit LoRA"]
TARGETS = ("c_attn", "c_proj", "c_fc")


def load_nanotune(folder, mode):
    from nanotune import GPT2
    from nanotune.lora import LoRAConfig, add_lora
    from nanotune.quantize import QuantConfig
    quant = {"8-bit LoRA": QuantConfig("8bit"), "4-bit LoRA": QuantConfig("4bit")}.get(mode)
    model = GPT2.from_pretrained(folder, quantize=quant)
    return model if mode == "fp32 full" else add_lora(model, LoRAConfig(TARGETS, r=8, alpha=16, dropout=0.05))


def step_nanotune(model, optimizer, ids):
    from nanotune.tricks import output_layer_lm_loss_sum
    total, count = output_layer_lm_loss_sum(model(ids, output_layer=False), model.lm_head.weight, ids)
    (total / count).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def load_reference(folder, mode):
    from transformers import BitsAndBytesConfig, GPT2LMHeadModel
    quant = {"8-bit LoRA": BitsAndBytesConfig(load_in_8bit=True),
             "4-bit LoRA": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                              bnb_4bit_compute_dtype=torch.float32)}.get(mode)
    model = GPT2LMHeadModel.from_pretrained(folder, quantization_config=quant)
    if mode == "fp32 full":
        return model
    from peft import LoraConfig, get_peft_model
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=list(TARGETS), task_type="CAUSAL_LM"))


def step_reference(model, optimizer, ids):
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def worker(impl, mode, size, steps):
    folder = checkpoint(size)
    if "bit" in mode:
        from nanotune.quantize import _bitsandbytes
        _bitsandbytes()              # both sides import bitsandbytes before the measured load
    import transformers  # noqa: F401  (imported by both, so neither pays for it inside the measurement)
    if impl == "nanotune":
        from nanotune.tricks import keep_freed_memory
        keep_freed_memory()          # as train.py does on CPU
    ids = torch.randint(0, 50000, (8, 128), generator=torch.Generator().manual_seed(0))
    reset_peak_rss()
    model = (load_nanotune if impl == "nanotune" else load_reference)(folder, mode).train()
    load_peak = peak_rss_mib()
    params = [p for p in model.parameters() if p.requires_grad]
    if impl == "nanotune":
        from nanotune.optim import make_optimizer
        optimizer, step = make_optimizer(model, 1e-4, 0.0), step_nanotune
    else:
        optimizer, step = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0), step_reference
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step(model, optimizer, ids)
        times.append(time.perf_counter() - start)
    steady = times[1:] if len(times) > 2 else times
    print(json.dumps({"load_peak_mib": load_peak, "train_peak_mib": peak_rss_mib(),
                      "tokens_per_s": ids.numel() * len(steady) / sum(steady)}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        impl, mode, size, steps = args.worker
        return worker(impl, mode, size, int(steps))
    size, steps = ("tiny", 3) if args.quick else ("124M", 6)
    checkpoint(size)
    rows = []
    for mode in MODES:
        r = {}
        for impl in ("reference", "nanotune"):
            out = subprocess.run([sys.executable, __file__, "--worker", impl, mode, size, str(steps)], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr)
            r[impl] = json.loads(out.stdout.strip().splitlines()[-1])
        ref, ours = r["reference"], r["nanotune"]
        rows.append([mode, ref["tokens_per_s"], ours["tokens_per_s"], f"{ours['tokens_per_s'] / ref['tokens_per_s']:.2f}x",
                     ref["load_peak_mib"], ours["load_peak_mib"], f"{ours['load_peak_mib'] / ref['load_peak_mib']:.2f}x",
                     ref["train_peak_mib"], ours["train_peak_mib"], f"{ours['train_peak_mib'] / ref['train_peak_mib']:.2f}x"])
        print(rows[-1], flush=True)
    report(f"LoRA / QLoRA, GPT-2 {size}, batch 8 x 128 (reference: transformers + peft + bitsandbytes)",
           ["mode", "ref tok/s", "nanotune tok/s", "speed", "ref load MiB", "nanotune load MiB", "load memory",
            "ref train MiB", "nanotune train MiB", "train memory"], rows)


if __name__ == "__main__":
    main()
