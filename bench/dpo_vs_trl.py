"""One DPO step: nanotune's (train.train_step on task "dpo") against TRL's DPOTrainer.

    python bench/dpo_vs_trl.py [--rounds 5] [--pairs 4] [--prompt 32] [--answer 64]

The same model (the GPT-2 architecture at the bench's "tiny" size: 2 layers of 128, GPT-2's 50,257-token
vocabulary, random weights), LoRA r 8 on the same layers in both, and the same batch: B pairs of
random ids, 2B rows (the chosen answers above the rejected ones, right-padded: TRL's layout and
nanotune's). Both take the reference from the same model with its adapters off, a forward pass
without gradients each step; both clip at 1.0 and step AdamW. TRL's step is its own compute_loss
(its forward, its reference pass, its loss), then backward, clipping and AdamW's step, as its
training loop does them. The two take turns, round after round, and each one's median counts.
Needs trl and peft (pip install trl peft); not a dependency of nanotune.
"""
import argparse
import copy
import statistics
import tempfile
import time

import torch
from common import checkpoint, matmul_peak, report, with_tokenizer


def cpu_name():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def make_pairs(n, prompt, answer, vocab, seed=0):
    from nanotune.preference import Pair
    g = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(0, vocab - 1, (k,), generator=g).tolist()
    return [Pair(ids(prompt), ids(answer), ids(answer - 8 * (i % 2))) for i in range(n)]    # answers of two lengths


def nanotune_step(folder, batch, targets):
    import train
    from nanotune.lora import LoRAConfig, add_lora
    from nanotune.models import load_model
    from nanotune.preference import without_dropout
    model = load_model(folder).train()
    add_lora(model, LoRAConfig(targets, r=8, alpha=16, dropout=0.0))
    without_dropout(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        summed, count, _ = train.train_step(model, [batch], optimizer, 1e-4, "dpo", 1.0, torch.device("cpu"), beta=0.1)
        return float(summed) / count
    return step


def trl_step(folder, batch, targets, texts):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    model = GPT2LMHeadModel.from_pretrained(folder)
    config = DPOConfig(output_dir=tempfile.mkdtemp(), beta=0.1, per_device_train_batch_size=len(texts), report_to=[],
                       use_cpu=True, bf16=False, max_grad_norm=1.0, learning_rate=1e-4, disable_dropout=True)
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(texts), processing_class=tokenizer,
                         peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(targets),
                                                fan_in_fan_out=True))
    trainer.create_optimizer()
    model, optimizer = trainer.model.train(), trainer.optimizer
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != -100).long()}

    def step():
        loss = trainer.compute_loss(model, copy.copy(inputs))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())
    return step


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--answer", type=int, default=64)
    args = p.parse_args()
    from nanotune.data import make_batch
    from nanotune.lora import DEFAULT_TARGETS
    torch.manual_seed(0)
    folder = with_tokenizer(checkpoint("tiny"))
    pairs = make_pairs(args.pairs, args.prompt, args.answer, 50257)
    batch = make_batch("dpo", pairs, None, list(range(len(pairs))), 50256, "cpu")
    # a TRL trainer needs a dataset to be built with; the batch it is timed on is the one above
    words = lambda ids: " ".join(f"w{i}" for i in ids)
    texts = [{"prompt": words(q.prompt), "chosen": words(q.chosen), "rejected": words(q.rejected)} for q in pairs]
    targets = DEFAULT_TARGETS["gpt2"]
    steps = {"nanotune": nanotune_step(folder, batch, targets), "TRL DPOTrainer": trl_step(folder, batch, targets, texts)}
    first = {name: step() for name, step in steps.items()}               # the first step: both ln 2
    times = {name: [] for name in steps}
    for _ in range(args.rounds):                                         # taking turns: the machine's drift hits both
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    peak = matmul_peak(torch.float32)
    rows = [[name, f"{first[name]:.6f}", median[name] * 1e3, median["TRL DPOTrainer"] / median[name]] for name in steps]
    title = (f"One DPO step, GPT-2 tiny + LoRA r 8, {args.pairs} pairs x ({args.prompt} + {args.answer}) tokens, fp32,"
             f" {cpu_name()}, matmul peak fp32 {peak / 1e9:,.0f} GFLOP/s")
    report(title, ["", "first-step loss", "ms a step (median)", "speed vs TRL"], rows,
           {"rounds": args.rounds, "times_ms": {k: [round(t * 1e3, 1) for t in v] for k, v in times.items()}})


if __name__ == "__main__":
    main()
