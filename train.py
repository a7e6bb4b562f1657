"""Fine-tune a pre-trained model: GPT-2 as a language model, or BERT as a classifier.

    python train.py --data data/anecdotes_jokes.txt                      # GPT-2, causal LM
    python train.py --model sentence-transformers/all-MiniLM-L6-v2 \\
        --data data/sentiment_train.csv --val-data data/sentiment_val.csv   # BERT, classification

The steps, in order: load the pre-trained model and tokenizer, load the data, tokenize it,
fine-tune in a plain epoch loop, evaluate after every epoch, save. `python train.py --help`
lists every option.
"""
import argparse
import contextlib
import math
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from nanotune import NanotuneError, distributed, load_tokenizer
from nanotune.cli import HelpFormatter, keep_freed_memory, run
from nanotune.checkpoint import load_state, save_state
from nanotune.data import batch_order, classify_batch, lm_batch, lm_sequences, mix, pack, read_examples, split
from nanotune.lora import DEFAULT_TARGETS, LoRAConfig, add_lora, load_adapter, merge_lora, save_adapter
from nanotune.losses import causal_lm_loss_sum, classification_loss, output_layer_lm_loss_sum
from nanotune.metrics import MetricsLog, accuracy_and_macro_f1
from nanotune.models import TASKS, load_model, model_type
from nanotune.optim import freeze, lr_at, make_optimizer
from nanotune.quantize import QuantConfig, footprint_bytes, parameter_count


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Fine-tune GPT-2 (text generation) or BERT (classification).",
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="gpt2", help="Hub id or local folder of a GPT-2 or BERT checkpoint")
    g.add_argument("--task", choices=["lm", "classify"], help="default: lm for GPT-2, classify for BERT")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    g = p.add_argument_group("data")
    g.add_argument("--data", action="append", required=True, metavar="FILE",
                   help=".txt (one example a line), .jsonl, .csv or .tsv; repeat to mix several files (also looked up in data/)")
    g.add_argument("--data-weights", type=float, nargs="+", metavar="W", help="share of each --data file in the mix, e.g. 1 3")
    g.add_argument("--val-data", metavar="FILE", help="validation file (default: hold out --val-split of the training data)")
    g.add_argument("--val-split", type=float, default=0.1, help="fraction held out for validation when there is no --val-data; 0 for none")
    g.add_argument("--text-column", default="text", help="text field of .jsonl/.csv/.tsv files")
    g.add_argument("--label-column", default="label", help="label field of .jsonl/.csv/.tsv files (classification)")
    g.add_argument("--max-length", type=int, help="tokens per example (default: the model's context); longer LM texts are cut into windows, longer classification texts truncated")
    g.add_argument("--pack", action="store_true", help="LM: concatenate texts (EOS between) into full --max-length blocks, no padding")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=3)
    g.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=5e-5, help="peak learning rate")
    g.add_argument("--lr-schedule", choices=["linear", "cosine", "constant"], default="linear", help="decay after warm-up")
    g.add_argument("--warmup-steps", type=int, default=0, help="optimizer steps of linear warm-up")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decoupled weight decay (linear-layer matrices only)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm to this; 0 turns clipping off")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward pass (weights and optimizer stay fp32)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward: less memory, ~30%% slower")
    g.add_argument("--freeze", metavar="WHAT", help="keep fixed: embeddings, N (embeddings + first N layers), or body (all but the head)")
    g.add_argument("--class-weights", choices=["balanced"], help="classification: weight each label by 1/frequency")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="classification: target probability spread over all labels")
    g.add_argument("--patience", type=int, help="stop after this many epochs without a better validation loss")
    g.add_argument("--seed", type=int, default=42, help="same seed, same data order, same run")
    g.add_argument("--fsdp", action="store_true", help="under torchrun: shard the model across ranks (FSDP) instead of copying it (DDP)")
    g = p.add_argument_group("LoRA and quantization (QLoRA)")
    g.add_argument("--quantize", choices=["8bit", "4bit"], help="load the linear layers in 8 or 4 bits (bitsandbytes); trains LoRA adapters")
    g.add_argument("--quant-type", choices=["nf4", "fp4"], default="nf4", help="4-bit number format")
    g.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True, help="4-bit: quantize the scales too")
    g.add_argument("--quantize-skip", default="lm_head,classifier", help="comma-separated layer names kept in full precision")
    g.add_argument("--lora-r", type=int, help="LoRA rank: train adapters instead of the whole model (default: 8 with --quantize, else off)")
    g.add_argument("--lora-alpha", type=float, default=16, help="LoRA scale: the update is multiplied by alpha / r")
    g.add_argument("--lora-dropout", type=float, default=0.05)
    g.add_argument("--lora-targets", help="comma-separated layer names (default: c_attn,c_proj,c_fc for GPT-2; query,key,value,dense for BERT)")
    g.add_argument("--merge", action="store_true", help="also write OUT/merged: the adapter folded into the (de-quantized) weights, a plain Hub model")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="out", help="folder for the model (Hub layout), metrics.jsonl and the training state")
    g.add_argument("--resume", action="store_true", help="continue the interrupted run in --out exactly where it stopped")
    g.add_argument("--overwrite", action="store_true", help="allow a non-empty --out that is not being resumed")
    g.add_argument("--stop-after-epochs", type=int, metavar="N", help="stop (resumably) after N epochs, e.g. to fit a time limit")
    return p.parse_args(argv)


def prepare_out(args, main_process) -> Path:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NanotuneError(f"--out {out} is a file: give a folder")
    if args.resume and not (out / "checkpoint").is_dir():
        raise NanotuneError(f"--resume: {out} holds no interrupted run (no {out}/checkpoint): start without --resume")
    if not args.resume and out.is_dir() and any(out.iterdir()):
        if not args.overwrite:
            raise NanotuneError(f"--out {out} already has files: choose another --out, add --resume to continue that run, or --overwrite to replace it")
        if main_process:
            shutil.rmtree(out)
    return out


def lora_settings(args, kind):
    """(QuantConfig or None, LoRAConfig or None) from the command line."""
    r = args.lora_r if args.lora_r is not None else (8 if args.quantize else 0)
    if args.quantize and r == 0:
        raise NanotuneError("--quantize stores weights in 8 or 4 bits, which cannot be trained directly: train LoRA adapters on them (--lora-r 8)")
    if args.merge and not r:
        raise NanotuneError("--merge folds a LoRA adapter into the model: use it with --lora-r or --quantize")
    quant = QuantConfig(args.quantize, args.quant_type, args.double_quant, torch.bfloat16 if args.bf16 else torch.float32,
                        tuple(args.quantize_skip.split(","))) if args.quantize else None
    targets = tuple(args.lora_targets.split(",")) if args.lora_targets else DEFAULT_TARGETS[kind]
    return quant, (LoRAConfig(targets, r, args.lora_alpha, args.lora_dropout) if r else None)


def load_data(args, task):
    """Training and validation examples (lists of {"text", "label"} dicts) and the label names."""
    with_labels = task == "classify"
    read = lambda f: read_examples(f, args.text_column, args.label_column, with_labels)
    train = mix([read(f) for f in args.data], args.data_weights, args.seed)
    if args.val_data:
        val = read(args.val_data)
    elif args.val_split > 0:
        train, val = split(train, args.val_split, args.seed)
    else:
        val = []
    if not with_labels:
        return train, val, None
    names = sorted({e["label"] for e in train}, key=lambda s: (int(s) if s.lstrip("-").isdigit() else math.inf, s))
    unseen = sorted({e["label"] for e in val} - set(names))
    if unseen:
        raise NanotuneError(f"validation labels never seen in training: {', '.join(unseen)}; training has {', '.join(names)}")
    if len(names) < 2:
        raise NanotuneError(f"the training data has only one label ({names[0]}): a classifier needs at least two")
    return train, val, names


def tokenize(examples, tokenizer, task, max_length, labels, packed):
    """Token ids per example (and label ids). Long texts are counted and reported, never dropped silently."""
    ids = tokenizer.encode_batch([e["text"] for e in examples])
    if task == "lm":
        if packed:
            return pack(ids, max_length, tokenizer.eos_id), None, 0
        sequences, too_long = lm_sequences(ids, max_length, tokenizer.eos_id)
        return sequences, None, too_long
    too_long = sum(len(s) > max_length for s in ids)
    sequences = [s if len(s) <= max_length else s[:max_length - 1] + s[-1:] for s in ids]   # keep the final [SEP]
    return sequences, [labels.index(e["label"]) for e in examples], too_long


def make_batch(task, sequences, label_ids, indices, pad_id, device):
    if task == "lm":
        batch = lm_batch([sequences[i] for i in indices], pad_id)
    else:
        batch = classify_batch([sequences[i] for i in indices], [label_ids[i] for i in indices], pad_id)
    return {k: v.to(device, non_blocking=True) if v is not None else None for k, v in batch.items()}


def loss_sum(model, batch, task, class_weights, label_smoothing, output_weight=None):
    """Summed loss over the batch and what it sums over (real tokens for LM, examples for classification).
    Given the output layer's weight, the LM loss applies it itself, a chunk of positions at a time, so
    the (B, T, 50257) logits never exist whole."""
    if task == "lm" and output_weight is not None:
        hidden = model(batch["input_ids"], batch["attention_mask"], output_layer=False)
        return output_layer_lm_loss_sum(hidden, output_weight, batch["labels"])
    logits = model(batch["input_ids"], batch["attention_mask"])
    if task == "lm":
        return causal_lm_loss_sum(logits, batch["labels"])
    n = batch["labels"].numel()
    return classification_loss(logits, batch["labels"], class_weights, label_smoothing) * n, torch.tensor(n)


@torch.no_grad()
def evaluate(model, task, sequences, label_ids, batch_size, pad_id, device, autocast, num_labels):
    model.eval()
    total, count, predictions = 0.0, 0, []
    for indices in batch_order(len(sequences), batch_size, 0, 0, shuffle=False):
        batch = make_batch(task, sequences, label_ids, indices, pad_id, device)
        with autocast():
            logits = model(batch["input_ids"], batch["attention_mask"])
        if task == "lm":
            s, n = causal_lm_loss_sum(logits, batch["labels"])
        else:
            s, n = classification_loss(logits, batch["labels"]) * len(indices), len(indices)
            predictions.append(logits.argmax(-1).cpu())
        total, count = total + float(s), count + int(n)
    model.train()
    result = {"loss": total / max(count, 1)}
    if task == "lm":
        result["perplexity"] = math.exp(min(result["loss"], 50))
    else:
        result["accuracy"], result["macro_f1"] = accuracy_and_macro_f1(torch.cat(predictions), torch.tensor(label_ids), num_labels)
    return result


def main(args):
    device, rank, world = distributed.setup(args.device)     # several ranks when started by torchrun
    main_process = rank == 0                                 # the one that prints and saves
    if device.type == "cpu":
        keep_freed_memory()                                  # each step reuses the last step's memory
    say = print if main_process else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    out = prepare_out(args, main_process)
    if args.fsdp and (world == 1 or args.lora_r or args.quantize or args.resume):
        raise NanotuneError("--fsdp shards a full model across the ranks of a torchrun; it does not combine with LoRA, --quantize or --resume (use DDP: leave --fsdp out)")

    # 1. The pre-trained model and its tokenizer ------------------------------------------------
    kind = model_type(args.model)
    task = TASKS[kind]
    if args.task and args.task != task:
        raise NanotuneError(f"--task {args.task} does not fit {args.model}: GPT-2 models train as lm, BERT models as classify")
    quant, lora = lora_settings(args, kind)
    train_examples, val_examples, labels = load_data(args, task)           # 2. The data
    model = load_model(args.model, labels=labels, device=device, quantize=quant)
    tokenizer = load_tokenizer(args.model)
    if lora:    # freeze the model, train small adapters beside its linear layers
        add_lora(model, lora)
    context = model.config.n_positions if task == "lm" else model.config.max_position_embeddings
    max_length = args.max_length or context
    if max_length > context:
        raise NanotuneError(f"--max-length {max_length} is more than the model's {context} positions: use at most {context}")
    if args.grad_checkpointing:
        getattr(model, "bert", model).gradient_checkpointing = True
    if args.freeze:
        freeze(model, args.freeze)

    # 3. Tokenize ------------------------------------------------------------------------------
    train_ids, train_labels, too_long = tokenize(train_examples, tokenizer, task, max_length, labels, args.pack)
    val_ids, val_labels, _ = tokenize(val_examples, tokenizer, task, max_length, labels, args.pack)
    n_tokens = sum(len(s) for s in train_ids)
    say(f"data: {len(train_examples)} training and {len(val_examples)} validation examples, {n_tokens:,} training tokens"
          + (f", labels {labels}" if labels else "")
          + (f"; {too_long} examples longer than {max_length} tokens were " + ("split into windows" if task == "lm" else "truncated") if too_long else ""))
    class_weights = None
    if args.class_weights == "balanced":      # n / (k * count): each label weighs the same in total
        counts = Counter(train_labels)
        class_weights = torch.tensor([len(train_labels) / (len(labels) * counts[k]) for k in range(len(labels))], device=device)

    # 4. Optimizer and schedule (the model wrapped for several ranks first: DDP or FSDP) ----------
    train_model = distributed.wrap(model, device, args.fsdp) if world > 1 else model
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    steps_per_epoch = math.ceil(math.ceil(len(train_ids) // world / args.batch_size) / args.grad_accum)
    total_steps = steps_per_epoch * args.epochs
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = parameter_count(model)
    say(f"model: {args.model} ({task}), {trainable:,} of {total:,} parameters trainable ({trainable / total:.2%}),"
          f" {footprint_bytes(model) / 2**20:,.1f} MiB in memory (fp32: {total * 4 / 2**20:,.1f} MiB), on {device};"
          f" {args.epochs} epochs of {steps_per_epoch} steps" + (f" on each of {world} ranks" if world > 1 else ""))
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    # GPT-2's output layer, applied by the loss itself (not with FSDP, which keeps it sharded).
    output_weight = model.lm_head.weight if task == "lm" and not args.fsdp else None

    progress = {"epoch": 0, "step_in_epoch": 0, "step": 0, "best": math.inf, "bad_epochs": 0}
    if args.resume:
        progress = load_state(out / "checkpoint", model, optimizer)
        say(f"resuming at epoch {progress['epoch'] + 1}, step {progress['step']}")
    out.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(out, enabled=main_process)

    # Ctrl-C / SIGTERM: finish the current optimizer step, save a resumable state, stop.
    stop = {"signal": None}
    def request_stop(signum, frame):
        stop["signal"] = signum
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, request_stop)

    # 5. Fine-tune, in a plain epoch loop ------------------------------------------------------
    model.train()
    step = progress["step"]
    for epoch in range(progress["epoch"], args.epochs):
        batches = batch_order(len(train_ids), args.batch_size, args.seed, epoch, rank=rank, world=world)
        steps = [batches[i:i + args.grad_accum] for i in range(0, len(batches), args.grad_accum)]
        first = progress["step_in_epoch"] if epoch == progress["epoch"] else 0
        bar = tqdm(range(first, len(steps)), desc=f"epoch {epoch + 1}/{args.epochs}", total=len(steps), initial=first, dynamic_ncols=True, disable=not main_process)
        running_loss, running_count, tokens, t0 = torch.zeros((), device=device), 0, 0, time.time()
        for step_in_epoch in bar:
            lr = lr_at(step, args.lr, args.warmup_steps, total_steps, args.lr_schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro_batches = [make_batch(task, train_ids, train_labels, idx, tokenizer.pad_id, device) for idx in steps[step_in_epoch]]
            # Divide by the real tokens (LM) or examples of the whole step, on all ranks, not per micro-batch.
            local = sum(int((b["labels"] != -100).sum()) if task == "lm" else len(b["labels"]) for b in micro_batches)
            (denominator,) = distributed.sum_across(local, device=device)
            for i, batch in enumerate(micro_batches):
                # DDP averages gradients over ranks in backward: skip that until the last micro-batch.
                last = i == len(micro_batches) - 1
                with contextlib.nullcontext() if last or world == 1 or args.fsdp else train_model.no_sync(), autocast():
                    summed, _ = loss_sum(train_model, batch, task, class_weights, args.label_smoothing, output_weight)
                (summed * world / denominator).backward()      # x world: DDP divides by it when averaging
                running_loss += summed.detach()
            running_count += denominator
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += sum(int(b["attention_mask"].sum()) if b["attention_mask"] is not None else b["input_ids"].numel() for b in micro_batches)

            if step % 10 == 0 or step_in_epoch == len(steps) - 1:   # reading the loss waits for the device: not every step
                loss_total, count_total = distributed.sum_across(running_loss.item(), running_count, device=device)
                loss = loss_total / count_total
                if not math.isfinite(loss):
                    bar.close()
                    raise NanotuneError(f"the loss became {loss} at step {step}; nothing was saved from this step on."
                                        " Lower --lr, keep --max-grad-norm on, or check the data")
                speed = tokens * world / (time.time() - t0)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{speed:,.0f}")
                log.log("train", epoch=epoch + 1, step=step, loss=loss, lr=lr, tokens_per_s=speed)
                running_loss.zero_()
                running_count = 0
            if distributed.sum_across(stop["signal"] is not None, device=device)[0]:   # every rank stops at the same step
                if main_process and not args.fsdp:
                    save_state(out / "checkpoint", model, optimizer, progress | {"epoch": epoch, "step_in_epoch": step_in_epoch + 1, "step": step})
                bar.close()
                distributed.barrier()
                say(f"stopped by signal {stop['signal']}: the state is saved; continue with the same command plus --resume")
                return 128 + (stop["signal"] or signal.SIGTERM)
        bar.close()

        # 6. Evaluate, keep the best epoch ----------------------------------------------------
        progress.update(epoch=epoch + 1, step_in_epoch=0, step=step)
        if val_ids:
            scores = evaluate(train_model, task, val_ids, val_labels, args.batch_size, tokenizer.pad_id, device, autocast, len(labels or ()))
            log.log("eval", epoch=epoch + 1, step=step, **scores)
            say(f"epoch {epoch + 1}: " + ", ".join(f"validation {k} {v:.4f}" for k, v in scores.items()))
            improved = scores["loss"] < progress["best"]
            progress.update(best=min(progress["best"], scores["loss"]), bad_epochs=0 if improved else progress["bad_epochs"] + 1)
        else:
            improved = True
        if improved:   # 7. Save: a Hub-layout model (or PEFT adapter) that generate.py and transformers load
            full = distributed.full_state_dict(model, args.fsdp)      # FSDP: every rank hands in its shard
            if main_process:
                save_adapter(model, out, lora, args.model) if lora else model.save_pretrained(out, state_dict=full)
                tokenizer.save(out)
        if main_process and not args.fsdp:
            save_state(out / "checkpoint", model, optimizer, progress)
        distributed.barrier()     # nobody reads or writes OUT while rank 0 is still writing it
        if args.patience is not None and progress["bad_epochs"] >= args.patience:
            say(f"early stop: no better validation loss for {args.patience} epochs")
            break
        if args.stop_after_epochs is not None and epoch + 1 >= args.stop_after_epochs and epoch + 1 < args.epochs:
            say(f"stopped after epoch {epoch + 1} as asked: continue with the same command plus --resume")
            return 0

    distributed.shutdown()
    if lora and args.merge and main_process:   # the best adapter, folded into the weights it was trained against
        merged = merge_lora(load_adapter(load_model(args.model, labels=labels, device=device, quantize=quant), out))
        merged.save_pretrained(out / "merged")
        tokenizer.save(out / "merged")
        say(f"merged model: {out / 'merged'}/")
    if log.plot():
        say(f"loss curve: {out / 'loss.png'}")
    say(f"saved the best model (validation loss {progress['best']:.4f}) to {out}/" if val_ids else f"saved the model to {out}/")
    return 0


if __name__ == "__main__":
    run(main, parse_args)
