"""Generation speed: nanotune's KV-cached decoding vs `transformers` generate, side by side.

    python bench/generation.py [--quick] [--model gpt2|smollm2]

New tokens per second for batch 1 and batch 8, greedy and sampling, on a GPT-2 124M-architecture
checkpoint or the real SmolLM2-135M (a Llama with grouped-query attention); fp32 for both, and nanotune's bf16 against the reference's fp32 where the CPU has bf16
arithmetic (elsewhere bf16 is emulated, far slower than fp32, and left out). Then nanotune's 8-bit
and 4-bit (bitsandbytes) models at batch 1, greedy, against nanotune's fp32, with the
quantized_decoding trick on and off. The contenders take turns, and each one's best of the rounds
counts. Each table carries the matmul peak measured in its run.
"""
import argparse

import torch
from common import checkpoint, memory_bandwidth, native_bf16, peaks_note, report, smollm2, timed

from nanotune import tricks
from nanotune.generation import generate
from nanotune.models import load_model
from nanotune.quantize import QuantConfig


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="tiny model, 32 new tokens")
    p.add_argument("--model", choices=["gpt2", "smollm2"], default="gpt2")
    args = p.parse_args()
    size, new_tokens, repeat = ("tiny", 32, 1) if args.quick else ("124M", 128, 3)
    folder = smollm2() if args.model == "smollm2" else checkpoint(size)
    name = "SmolLM2-135M" if args.model == "smollm2" else f"GPT-2 {size}"
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(folder).eval()
    ours = {"fp32": load_model(folder)} | ({"bf16": load_model(folder, dtype=torch.bfloat16)} if native_bf16() else {})
    eos = ref.config.eos_token_id
    vocab = ref.config.vocab_size
    # Decoding one sequence reads every weight once a token: the memory's speed bounds it.
    weight_bytes = 4 * sum(p.numel() for p in ours["fp32"].parameters())
    limit = memory_bandwidth() / weight_bytes                 # tokens/s if reading the weights were all a step did
    rows = []
    for batch in (1, 8):
        prompts = torch.randint(0, vocab, (batch, 16), generator=torch.Generator().manual_seed(batch))
        for mode, sampling in (("greedy", {}), ("sampling", dict(do_sample=True, top_k=50, temperature=0.8))):
            def reference():
                with torch.inference_mode():   # min_new_tokens: every row runs the full length, as ours does
                    ref.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, pad_token_id=eos, **({"do_sample": False} | sampling))

            def nanotune(model):
                return lambda: generate(model, prompts.tolist(), new_tokens, eos, None,
                                        temperature=0.8 if sampling else 0, top_k=50 if sampling else None)
            runs = {"reference": reference} | {dtype: nanotune(model) for dtype, model in ours.items()}
            best = dict.fromkeys(runs, float("inf"))
            for _ in range(repeat):          # interleaved: a slow spell of the machine hits every contender
                for name, run in runs.items():
                    best[name] = min(best[name], timed(run))
            tps = {name: batch * new_tokens / t for name, t in best.items()}
            for dtype in ours:
                share = f"{tps[dtype] / limit:.0%}" if batch == 1 and dtype == "fp32" else ""
                rows.append([batch, mode, f"nanotune {dtype} vs reference fp32", tps["reference"], tps[dtype],
                             f"{tps[dtype] / tps['reference']:.2f}x", share])
                print(rows[-1], flush=True)
    report(f"Generation, {name}, {new_tokens} new tokens (new tokens/s); {peaks_note()}; memory read at"
           f" {memory_bandwidth() / 1e9:.1f} GB/s, so one fp32 sequence is bound at {limit:.1f} tokens/s",
           ["batch", "decoding", "comparison", "reference tok/s", "nanotune tok/s", "ratio", "share of the memory bound"],
           rows)
    quantized(folder, ours["fp32"], new_tokens, repeat, vocab)


def quantized(folder, fp32_model, new_tokens, repeat, vocab):
    """Batch 1, greedy: the quantized models against the fp32 one, quantized_decoding on and off."""
    models = {"8-bit": load_model(folder, quantize=QuantConfig("8bit")),           # as generate.py loads them
              "4-bit": load_model(folder, quantize=QuantConfig("4bit", cpu_inference_kernel=True))}
    prompts = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(1)).tolist()

    def run(model, off=()):
        def go():
            with tricks.plain(off):
                generate(model, prompts, new_tokens, 0, None, temperature=0)
        return go
    runs = {"fp32": run(fp32_model)} | {f"{name}{label}": run(m, off) for name, m in models.items()
                                       for label, off in (("", ()), (", quantized_decoding off", ["quantized_decoding"]))}
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeat):
        for name, go in runs.items():
            best[name] = min(best[name], timed(go))
    rows = [[name, new_tokens / t, f"{best['fp32'] / t:.2f}x"] for name, t in best.items()]
    report(f"Decoding quantized models, batch 1, greedy, {new_tokens} new tokens; {peaks_note()}",
           ["nanotune model", "tok/s", "vs nanotune fp32"], rows)


if __name__ == "__main__":
    main()
