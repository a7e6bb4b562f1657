"""Fine-tune a pre-trained model: GPT-2 as a language model, or BERT as a classifier.

    python train.py --data data/anecdotes_jokes.txt                      # GPT-2, causal LM
    python train.py --model sentence-transformers/all-MiniLM-L6-v2 \\
        --data data/sentiment_train.csv --val-data data/sentiment_val.csv   # BERT, classification

`main` below takes the steps in order: load the data, load the pre-trained model and its
tokenizer, tokenize, fine-tune in a plain epoch loop (`train_step` is one optimizer step),
evaluate after every epoch, save. Everything a run needs is read and checked before anything is
written. `python train.py --help` lists every option.
"""
import argparse
import dataclasses
import importlib.util
import itertools
import json
import math
from pathlib import Path

import torch
from tqdm import tqdm

from nanotune import NanotuneError, distributed, hub, load_tokenizer, memory, run_folder, search, tricks
from nanotune.checkpoint import StopSignals, load_state, save_state
from nanotune.data_report import data_report, format_report
from nanotune.cli import ArgumentParser, add_plain_flag, device, native_bf16, number, run, text, whole_number
from nanotune.data import batch_order, classify_batch, find_data_file, lm_batch, lm_sequences, mix, pack, padding_share, read_examples, split, truncate
from nanotune.files import write_json
from nanotune.hub import own_memory
from nanotune.lora import DEFAULT_TARGETS, LoRAConfig, add_lora, load_adapter, merge_lora, save_adapter
from nanotune.losses import balanced_class_weights, causal_lm_loss_sum, classification_loss, scored_count
from nanotune.evaluate import classification_report
from nanotune.fidelity import layer_errors, summary
from nanotune.metrics import MetricsLog, RunningLoss
from nanotune.models import TASKS, check_tokenizer_fits, load_model, model_config, model_type
from nanotune.batch_view import batch_notes, show_batch
from nanotune.lr_find import CAVEAT as LR_CAVEAT
from nanotune.lr_find import format_table as format_lr_table
from nanotune.lr_find import lr_range_test, restored, suggestions
from nanotune.lr_find import plot as plot_lr_find
from nanotune.optim import format_groups, freeze, layers_of, lr_at, make_optimizer, unfreeze_gradually
from nanotune.quantize import QuantConfig, footprint_bytes, parameter_count
from nanotune.vocab import add_tokens, read_tokens, resize_token_embeddings


def layers_to_freeze(value):
    if value in ("embeddings", "body") or value.isdigit():
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: use embeddings, body, or a number of layers")


def parser():
    """Every flag is checked as it is read: a value out of range stops here, before any work."""
    p = ArgumentParser(description="Fine-tune GPT-2 (text generation) or BERT (classification).")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="gpt2", type=text("a Hub id or a model folder"), help="Hub id or local folder of a GPT-2 or BERT checkpoint")
    g.add_argument("--task", choices=["lm", "classify"], help="default: lm for GPT-2, classify for BERT")
    g.add_argument("--new-head", action="store_true", help="classification: replace the checkpoint's classifier head with a new one for the data's labels")
    g.add_argument("--device", type=device, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    g = p.add_argument_group("data")
    g.add_argument("--data", action="append", required=True, metavar="FILE", type=text("a data file"),
                   help=".txt (one example a line), .jsonl, .csv or .tsv; repeat to mix several files (also looked up in data/)")
    g.add_argument("--data-weights", type=number(0, low_open=True), nargs="+", metavar="W", help="share of each --data file in the mix, e.g. 1 3")
    g.add_argument("--val-data", metavar="FILE", type=text("a data file"), help="validation file (default: hold out --val-split of the training data)")
    g.add_argument("--val-split", type=number(0, 1, high_open=True), default=0.1, help="fraction held out for validation when there is no --val-data; 0 for none")
    g.add_argument("--text-column", default="text", type=text("a column name"), help="text field of .jsonl/.csv/.tsv files")
    g.add_argument("--label-column", default="label", type=text("a column name"), help="label field of .jsonl/.csv/.tsv files (classification)")
    g.add_argument("--max-length", type=whole_number(2), help="tokens per example (default: the model's context); longer LM texts are cut into windows, longer classification texts truncated")
    g.add_argument("--pack", action="store_true", help="LM: concatenate texts (EOS between) into full --max-length blocks, no padding")
    g.add_argument("--group-by-length", action="store_true", help="batches of examples of similar length: less padding, batches still in random order")
    g.add_argument("--stride", type=whole_number(1), help="LM: cut long texts into windows this many tokens apart (default: --max-length, side by side);"
                   " a smaller stride overlaps them, so every token is scored once but with context from the window before")
    g.add_argument("--truncate", choices=["head", "tail", "head+tail"], default="head",
                   help="classification: what to keep of a text longer than --max-length (head+tail: the first quarter and the end)")
    g.add_argument("--data-report", action="store_true", help="print what the tokenizer makes of the data (split words, lengths, labels) and stop")
    g.add_argument("--add-tokens", metavar="TOKENS", type=text("tokens separated by commas, or a file"),
                   help="new whole tokens, e.g. \"<|user|>,<|bot|>\", or a file with one a line; the embedding grows to match")
    g.add_argument("--pad-vocab-to-multiple-of", type=whole_number(1), metavar="N", help="round the embedding's rows up to a multiple of N")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=whole_number(1), default=3)
    g.add_argument("--batch-size", type=whole_number(1), default=8, help="examples per micro-batch")
    g.add_argument("--grad-accum", type=whole_number(1), default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=number(0, low_open=True), default=5e-5, help="peak learning rate")
    g.add_argument("--lr-schedule", choices=["linear", "cosine", "constant", "onecycle"], default="linear",
                   help="decay after warm-up; onecycle: up from lr/25 and down far below, as OneCycleLR")
    g.add_argument("--lr-decay", type=number(0, 1, low_open=True), metavar="F",
                   help="discriminative rates (ULMFiT): the head at --lr, each block below F times the one above, the embeddings lowest")
    g.add_argument("--unfreeze", choices=["gradual"], help="gradual: the first epoch trains the head only, each epoch after one more block down")
    g.add_argument("--warmup-steps", type=whole_number(0), default=0, help="optimizer steps of linear warm-up")
    g.add_argument("--weight-decay", type=number(0), default=0.01, help="AdamW decoupled weight decay (linear-layer matrices only)")
    g.add_argument("--max-grad-norm", type=number(0), default=1.0, help="clip the gradient norm to this; 0 turns clipping off")
    precision = g.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true",
                           help="bfloat16 autocast for the forward pass (weights and optimizer stay fp32); the default where the hardware multiplies bf16 natively")
    precision.add_argument("--fp32", action="store_true", help="no bf16 autocast, even where the hardware has it: every product in fp32")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward: less memory, ~30%% slower")
    g.add_argument("--freeze", metavar="WHAT", type=layers_to_freeze, help="keep fixed: embeddings, N (embeddings + first N layers), or body (all but the head)")
    g.add_argument("--class-weights", choices=["balanced"], help="classification: weight each label by 1/frequency")
    g.add_argument("--label-smoothing", type=number(0, 1, high_open=True), default=0.0, help="classification: target probability spread over all labels")
    g.add_argument("--patience", type=whole_number(1), help="stop after this many epochs without a better validation loss")
    g.add_argument("--seed", type=whole_number(0, 2**32 - 1), default=42, help="same seed, same data order, same run")
    g.add_argument("--fsdp", action="store_true", help="under torchrun: shard the model across ranks (FSDP) instead of copying it (DDP)")
    g = p.add_argument_group("LoRA and quantization (QLoRA)")
    g.add_argument("--quantize", choices=["8bit", "4bit"], help="load the linear layers in 8 or 4 bits (bitsandbytes); trains LoRA adapters")
    g.add_argument("--quant-type", choices=["nf4", "fp4"], default="nf4", help="4-bit number format")
    g.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True, help="4-bit: quantize the scales too")
    g.add_argument("--quantize-skip", default="lm_head,classifier", type=text("layer names, comma-separated"), help="comma-separated layer names kept in full precision")
    g.add_argument("--lora-r", type=whole_number(0), help="LoRA rank: train adapters instead of the whole model (default: 8 with --quantize, else off)")
    g.add_argument("--lora-alpha", type=number(0, low_open=True), default=16, help="LoRA scale: the update is multiplied by alpha / r")
    g.add_argument("--lora-dropout", type=number(0, 1, high_open=True), default=0.05)
    g.add_argument("--lora-targets", type=text("layer names, comma-separated"), help="comma-separated layer names (default: c_attn,c_proj,c_fc for GPT-2; query,key,value,dense for BERT)")
    g.add_argument("--merge", action="store_true", help="also write OUT/merged: the adapter folded into the (de-quantized) weights, a plain Hub model")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="out", type=text("a folder"), help="folder for the model (Hub layout), metrics.jsonl and the training state")
    g.add_argument("--resume", action="store_true", help="continue the interrupted run in --out exactly where it stopped")
    g.add_argument("--overwrite", action="store_true", help="replace an earlier nanotune run in --out (only the files nanotune wrote)")
    g.add_argument("--stop-after-epochs", type=whole_number(1), metavar="N", help="stop (resumably) after N epochs, e.g. to fit a time limit")
    g = p.add_argument_group("see what you train")
    g.add_argument("--show-batch", nargs="?", const=2, type=whole_number(1), metavar="N",
                   help="print the first N (default 2) examples of the first batch as the model sees them, and stop")
    g.add_argument("--dry-run", action="store_true", help="print the data report, the memory estimate and the first batch, and stop")
    g.add_argument("--show-groups", action="store_true", help="print the optimizer's parameter groups (rate, decay, size) and stop")
    g.add_argument("--lr-find", action="store_true", help="run an LR range test (OUT/lr_find.png and a table), suggest a rate, and stop")
    g.add_argument("--lr-find-check", action="store_true", help="with --lr-find: also train a few steps at the suggestion and at a tenth of it")
    g = p.add_argument_group("hyper-parameter search")
    g.add_argument("--search", action="append", metavar="NAME=VALUES", type=text("NAME=V1,V2,... or NAME=LOW:HIGH"),
                   help="try these values of a flag, e.g. lr=1e-5,5e-5,1e-4 (a grid over every --search), or lr=1e-6:1e-3 with --trials;"
                        " each trial is a train.py run in OUT/search/, ranked by validation loss; the best is kept in OUT")
    g.add_argument("--trials", type=whole_number(1, 1000), metavar="N", help="draw N random settings from the --search values and ranges")
    add_plain_flag(p)
    return p


def parse_args(argv=None):
    return parser().parse_args(argv)


# ---- checks that need more than one flag ---------------------------------------------------------

def check_settings(args, task):
    """Combinations that cannot work, refused before anything big is loaded."""
    if args.task and args.task != task:
        raise NanotuneError(f"--task {args.task} does not fit {args.model}: GPT-2 models train as lm, BERT models as classify")
    if task == "lm":
        for flag, given in (("--class-weights", args.class_weights), ("--label-smoothing", args.label_smoothing),
                            ("--new-head", args.new_head), ("--truncate", args.truncate != "head")):
            if given:
                raise NanotuneError(f"{flag} applies to classification, and {args.model} is a language model: leave it out")
    else:
        for flag, given in (("--pack", args.pack), ("--stride", args.stride)):
            if given:
                raise NanotuneError(f"{flag} applies to language modelling; {args.model} is a classifier: leave it out")
    if args.pack and args.stride:
        raise NanotuneError("--pack joins all texts into one stream of blocks; --stride overlaps the windows of each long text: choose one")
    if args.lr_find_check and not args.lr_find:
        raise NanotuneError("--lr-find-check compares rates after an LR range test: add --lr-find")
    if args.unfreeze and distributed.world_size() > 1:
        raise NanotuneError("--unfreeze gradual changes what trains from epoch to epoch, which DDP does not allow: run it in one process")
    if args.fsdp and (distributed.world_size() == 1 or args.lora_r or args.quantize):
        raise NanotuneError("--fsdp shards a full model across the ranks of a torchrun; it does not combine with LoRA or --quantize (use DDP: leave --fsdp out)")


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


def local_inputs(args):
    """The local files and folders the run reads: --out must not hold them."""
    model = Path(args.model).expanduser()
    return ([("--model", model if model.is_dir() else None)] + [("--data", find_data_file(f)) for f in args.data]
            + ([("--val-data", find_data_file(args.val_data))] if args.val_data else []))


def grow_tokenizer(args, tokenizer):
    """--add-tokens, the tokenizer's half: new whole tokens, so the data report and the batches
    already see them. Returns what `grow_embedding` needs."""
    wanted = read_tokens(args.add_tokens) if args.add_tokens else []
    before = tokenizer.vocab_size
    return wanted, add_tokens(tokenizer, wanted) if wanted else [], before


def grow_embedding(args, model, tokenizer, added, say):
    """--add-tokens and --pad-vocab-to-multiple-of, the model's half: as many new rows in the
    embedding as the tokenizer has new tokens (the transfer-learning step `resize_token_embeddings`).
    Returns the ids of the tokens added."""
    if not (args.add_tokens or args.pad_vocab_to_multiple_of):
        return []
    wanted, ids, before = added
    new = [i for i in ids if i >= before]
    rows = resize_token_embeddings(model, max(tokenizer.vocab_size, model.config.vocab_size), args.pad_vocab_to_multiple_of)
    if wanted:
        say(f"tokens: added {len(new)} of {len(wanted)} ({', '.join(t for t, i in zip(wanted, ids) if i >= before) or 'all were there'}),"
            f" ids {min(new) if new else '-'}..{max(new) if new else '-'}; the embedding has {rows:,} rows, new ones the mean of the others")
    return new


def context_length(args, config, task):
    context = config["n_positions"] if task == "lm" else config["max_position_embeddings"]
    max_length = args.max_length or context
    if max_length > context:
        raise NanotuneError(f"--max-length {max_length} is more than the model's {context} positions: use at most {context}")
    if args.stride and args.stride > max_length:
        raise NanotuneError(f"--stride {args.stride} is more than the windows' {max_length} tokens: the windows would skip tokens; use at most {max_length}")
    if task == "classify" and max_length < 3:
        raise NanotuneError(f"--max-length {max_length} leaves no room for text between [CLS] and [SEP]: use at least 3")
    return max_length


def check_memory(args, config, task, report, quant, lora, num_labels, device, say):
    """The run's peak memory, estimated before the model is loaded from config.json and the
    longest batch (examples are padded to the longest in their batch; --pack fills every row). A
    run that would not fit stops here, with the settings that would. Returns the estimate."""
    seq = report["lengths"]["max_length"] if task == "lm" and args.pack else min(report["lengths"]["max"], report["lengths"]["max_length"])
    settings = dict(batch=args.batch_size, seq=seq, bf16=args.bf16, quant=quant, lora=lora, checkpointing=args.grad_checkpointing,
                    labels=num_labels, chunked_loss=tricks.enabled("chunked_loss"), on_gpu=device.type == "cuda")
    parts = memory.estimate(config, **settings)
    say(memory.format_estimate(parts, args.batch_size, seq))
    free = memory.free_memory(device)
    if free is not None and parts["needed"] > free and not args.fsdp:     # (FSDP shards what is counted here)
        fits = memory.what_fits(config, settings, free, args.grad_accum)
        raise NanotuneError(f"the run needs about {parts['needed'] / memory.MiB:,.0f} MiB more but {device.type} has {free / memory.MiB:,.0f} MiB free: "
                            + (f"try {fits}" if fits else "even --quantize 4bit with LoRA, --grad-checkpointing and --batch-size 1 would not fit; use a smaller model"))
    return parts


def check_something_to_learn(task, train_ids, val_ids, world):
    """A run that would score nothing stops here, rather than saving an untrained model."""
    if len(train_ids) < world:
        raise NanotuneError(f"{len(train_ids)} training sequences cannot be shared by {world} ranks: add data or use fewer ranks")
    for name, ids in (("training", train_ids), ("validation", val_ids)):
        if task == "lm" and ids and not any(len(s) > 1 for s in ids):    # position t is scored on token t+1
            raise NanotuneError(f"no {name} token would be scored: every sequence is a single token, with no next token"
                                " to predict: use longer texts or a larger --max-length")


# ---- the steps -----------------------------------------------------------------------------------

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
    if len(names) < 2:
        raise NanotuneError(f"the training data has only one label ({names[0]}): a classifier needs at least two")
    return train, val, names


def tokenize(examples, tokenizer, task, max_length, labels, args):
    """Token ids per example, and per example its label id (classification) or the number of
    leading tokens that are context only (LM windows that overlap). Long texts are counted and
    reported, never dropped silently."""
    ids = tokenizer.encode_batch([e["text"] for e in examples])
    if task == "lm":
        if args.pack:
            return pack(ids, max_length, tokenizer.eos_id), None, 0
        sequences, contexts, too_long = lm_sequences(ids, max_length, tokenizer.eos_id, args.stride)
        return sequences, contexts, too_long
    unknown = sorted({e["label"] for e in examples} - set(labels))
    if unknown:
        raise NanotuneError(f"labels never seen in training: {', '.join(unknown)}; the model knows {', '.join(labels)}")
    too_long = sum(len(s) > max_length for s in ids)
    sequences = [truncate(s, max_length, args.truncate) for s in ids]
    return sequences, [labels.index(e["label"]) for e in examples], too_long


def padding_note(train_ids, args):
    """How much of the first epoch's batches is padding, with and without --group-by-length: on
    texts of mixed lengths grouping can save most of the compute."""
    if args.pack:
        return "padding: none (--pack)"
    lengths = [len(ids) for ids in train_ids]
    share = {grouped: padding_share(lengths, batch_order(len(lengths), args.batch_size, args.seed, 0, lengths=lengths if grouped else None))
             for grouped in (False, True)}
    other = f"{share[False]:.0%} without it" if args.group_by_length else f"{share[True]:.0%} with --group-by-length"
    return f"padding: {share[args.group_by_length]:.0%} of the batches' positions ({other})"


def make_batch(task, sequences, per_example, indices, pad_id, device):
    """A batch of the examples at `indices`; `per_example` holds their label ids (classification)
    or their context-only token counts (LM, None when no window overlaps)."""
    if task == "lm":
        batch = lm_batch([sequences[i] for i in indices], pad_id, [per_example[i] for i in indices] if per_example else None)
    else:
        batch = classify_batch([sequences[i] for i in indices], [per_example[i] for i in indices], pad_id)
    return {k: v.to(device, non_blocking=True) if v is not None else None for k, v in batch.items()}


def loss_sum(model, batch, task, class_weights=None, label_smoothing=0.0, output_weight=None):
    """The forward pass and the loss, summed over the batch's scored tokens (LM) or examples
    (classification). `output_weight`: GPT-2's output layer, for the loss's fast twin."""
    if task == "lm" and output_weight is not None and tricks.enabled("chunked_loss"):
        # The fast twin: the loss applies the output layer itself, a chunk of positions at a time,
        # so the (B, T, 50257) logits never exist whole (see nanotune/tricks.py).
        hidden = model(batch["input_ids"], batch["attention_mask"], output_layer=False)
        return tricks.output_layer_lm_loss_sum(hidden, output_weight, batch["labels"])[0]
    logits = model(batch["input_ids"], batch["attention_mask"])                  # (B, T, vocab) or (B, labels)
    if task == "lm":
        return causal_lm_loss_sum(logits, batch["labels"])[0]
    return classification_loss(logits, batch["labels"], class_weights, label_smoothing) * batch["labels"].numel()


def train_step(model, micro_batches, optimizer, lr, compute_loss, max_grad_norm, device):
    """One optimizer step: chapter 1's forward, loss, backward, step and zero_grad, with gradient
    clipping and accumulation over micro-batches. Returns the summed loss, what it sums over, and
    the gradient's norm before clipping (None without clipping)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)         # the schedule's rate (a share of it, per depth)
    # The loss is a mean over every scored token of the whole step, not of each micro-batch: each
    # micro-batch's sum is divided by the step's count (losses.causal_lm_loss_sum: SUM, then divide).
    count = sum(scored_count(batch) for batch in micro_batches)
    divisor = distributed.loss_divisor(count, device)        # in one process: count
    total = torch.zeros((), device=device)
    for i, batch in enumerate(micro_batches):
        with distributed.gradient_sync(model, i == len(micro_batches) - 1):
            summed = compute_loss(model, batch)               # forward pass and loss
        (summed / divisor).backward()                         # gradients add up over micro-batches
        total += summed.detach()
    norm = None
    if max_grad_norm > 0:
        # One odd batch can give a huge gradient; clipping its norm to 1.0 keeps a single step from
        # undoing what pre-training learned.
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)                     # set_to_none: the next backward writes afresh
    return total, count, norm


@torch.no_grad()
def evaluate(model, task, sequences, label_ids, batch_size, pad_id, device, autocast, num_labels):
    model.eval()                                              # dropout off: the model as it will be used
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
    result = {"loss": total / count}
    if task == "lm":
        result["perplexity"] = math.exp(min(result["loss"], 50))
    else:
        report = classification_report(torch.cat(predictions).tolist(), label_ids, list(range(num_labels)))
        result["accuracy"], result["macro_f1"] = report["accuracy"], report["macro_f1"]
    return result


def save_model(model, tokenizer, out, lora, args, main_process):
    """The model in the Hub layout (or the LoRA adapter in PEFT's), and its tokenizer."""
    full = distributed.full_state_dict(model, args.fsdp)      # FSDP: every rank hands in its shard
    if main_process:
        save_adapter(model, out, lora, args.model) if lora else model.save_pretrained(out, state_dict=full)
        tokenizer.save(out)


def quantization_report(model, args, task, examples, tokenizer, device, say):
    """What quantizing costs each layer, on a batch of the training data, against the checkpoint's
    full-precision weights (read one layer at a time); printed, and kept in OUT/quantization.json."""
    texts = [e["text"] for e in examples[:8]]
    ids, mask = tokenizer(texts, max_length=model.config.n_positions if task == "lm" else model.config.max_position_embeddings)
    rows = layer_errors(model, hub.resolve(args.model), {"input_ids": ids.to(device), "attention_mask": mask.to(device)})
    say(f"quantization ({args.quantize}{' ' + args.quant_type if args.quantize == '4bit' else ''}): {summary(rows)}")
    return {"quantization": args.quantize, "quant_type": args.quant_type, "double_quant": args.double_quant, "layers": rows}


@torch.no_grad()
def merge_drift(trained, merged, batch, evaluate_):
    """How far the merged model is from the quantized base + adapter that was trained."""
    trained.eval()
    merged.eval()
    difference = (trained(batch["input_ids"], batch["attention_mask"]).float() - merged(batch["input_ids"], batch["attention_mask"]).float()).abs().max()
    return {"max_logit_difference": float(difference), "trained": evaluate_(trained), "merged": evaluate_(merged)}


def find_learning_rate(args, model, train_model, optimizer, compute_loss, task, train_ids, train_labels, val_ids, val_labels,
                       tokenizer, device, autocast, labels, out, say):
    """--lr-find: the range test on the training data, its table and plot, a suggested rate; with
    --lr-find-check, a few steps at the suggestion and at a tenth of it. The weights and optimizer
    are put back after each: nothing here is trained for real."""
    batches = itertools.cycle(batch_order(len(train_ids), args.batch_size, args.seed, 0))

    def step_at(lr):
        batch = make_batch(task, train_ids, train_labels, next(batches), tokenizer.pad_id, device)
        summed, count, _ = train_step(train_model, [batch], optimizer, lr, compute_loss, args.max_grad_norm, device)
        return float(summed) / count
    result = lr_range_test(model, optimizer, step_at)
    suggested = suggestions(result)
    say(format_lr_table(result, suggested))
    write_json(result | {"suggestions": suggested}, out / "lr_find.json")
    if plot_lr_find(result, suggested, out / "lr_find.png"):
        say(f"plot: {out / 'lr_find.png'}")
    if suggested is None:
        raise NanotuneError("the loss exploded within the first steps of the range test: nothing to suggest; check the data, or lower --max-grad-norm")
    say(f"suggested learning rate: {suggested['valley']:.1e} (valley), {suggested['steepest']:.1e} (steepest descent)\nnote: {LR_CAVEAT}")
    if args.lr_find_check:
        steps = min(50, len(train_ids) // args.batch_size or 1)
        for lr in (suggested["valley"], suggested["valley"] / 10):
            with restored(model, optimizer):
                losses = [step_at(lr) for _ in range(steps)]
                scores = evaluate(train_model, task, val_ids, val_labels, args.batch_size, tokenizer.pad_id, device, autocast, len(labels or ())) if val_ids else {}
            say(f"{steps} steps at {lr:.1e}: training loss {sum(losses[-5:]) / len(losses[-5:]):.4f} over the last 5"
                + (f", validation loss {scores['loss']:.4f}" if scores else ""))
    return 0


def take_output_folder(out, start, model, optimizer, args, main_process, say):
    """Lock --out (one run per folder), clear what a killed run left half-written, and for a
    resumed run load the saved state and cut the metrics back to it. Returns where training starts."""
    distributed.barrier()                                    # every rank has checked --out before rank 0 locks it
    folder = run_folder.RunFolder(out).claim(start) if main_process else None
    distributed.barrier()
    progress = {"epoch": 0, "step_in_epoch": 0, "step": 0, "best": math.inf, "bad_epochs": 0}
    if start == "resume":
        progress = load_state(out / "checkpoint", model, optimizer, sharded=args.fsdp)
        say(f"resuming at epoch {progress['epoch'] + 1}, step {progress['step']}")
    elif start == "restart":
        say(f"note: {out} holds no saved training state yet, so --resume starts the run from the beginning")
    if main_process:
        folder.trim_metrics(progress["step"])                # the steps after it are about to be redone
        record_settings(out, args, start == "resume", say)
    return progress


def report_training(running, bar, log, epoch, step, lr, device):
    """The mean loss since the last report, on the progress bar and in metrics.jsonl; a loss
    that is no longer finite stops the run before anything of it is saved."""
    loss, speed, norms = running.read(device)
    if not math.isfinite(loss):
        bar.close()
        raise NanotuneError(f"the loss became {loss} at step {step}; nothing was saved from this step on."
                            " Lower --lr, keep --max-grad-norm on, or check the data")
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{speed:,.0f}")
    log.log("train", epoch=epoch + 1, step=step, loss=loss, lr=lr, tokens_per_s=speed, **norms)


def save_and_stop(out, model, optimizer, progress, args, main_process, say, signum):
    """Ctrl-C or SIGTERM: save the state after this step, so that --resume continues from it."""
    save_state(out / "checkpoint", model, optimizer, progress, sharded=args.fsdp)
    say(f"stopped by signal {signum}: the state is saved; continue with the same command plus --resume")
    return 128 + signum


def record_settings(out, args, resumed, say):
    """OUT/args.json: the run's settings. A resumed run is told which ones it changed."""
    settings = {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite")}
    path = out / "args.json"
    if resumed and path.is_file():
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            before = {}
        changed = [f"--{k.replace('_', '-')} {settings[k]} (was {before[k]})" for k in settings
                   if k in before and before[k] != settings[k] and k not in ("stop_after_epochs", "device")]
        if changed:
            say("note: resuming with settings that differ from the interrupted run's: " + ", ".join(changed))
    write_json(settings, path)


def main(args):
    if args.search or args.trials:                           # several short runs of this script, ranked
        return search.run(args, parser())
    if args.plain:
        tricks.turn_off(args.plain)                          # the textbook version of every step
    device, rank, world = distributed.setup(args.device)     # several ranks when started by torchrun
    main_process = rank == 0                                 # the one that prints and writes
    say = print if main_process else (lambda *a, **k: None)
    if device.type == "cpu" and tricks.enabled("keep_freed_memory"):
        tricks.keep_freed_memory()                           # each step reuses the last step's memory
    torch.manual_seed(args.seed)
    # bf16 autocast where the hardware multiplies bf16 natively: the matrix products run 2-3x faster,
    # and fine-tuning reaches the same loss, because only the products round to bf16's 8-bit
    # mantissa while the weights, their gradients and AdamW's moments stay fp32.
    args.bf16 = args.bf16 or (not args.fp32 and native_bf16(device))

    # Nothing is written until everything is read and checked: the flags (as they were parsed), the
    # output folder, the data, the model and its tokenizer, and that there is something to learn.
    kind = model_type(args.model)                            # finds the checkpoint and reads its config.json
    task = TASKS[kind]
    check_settings(args, task)
    looking_only = args.data_report or args.dry_run or args.show_batch    # these write nothing
    start = None if looking_only else run_folder.check(args.out, args.resume, args.overwrite, local_inputs(args))
    quant, lora = lora_settings(args, kind)

    # 1. The data. (Before the model, unlike chapter 1: a classifier's head is sized by the labels.)
    train_examples, val_examples, names = load_data(args, task)

    # 2. The pre-trained model and its tokenizer --------------------------------------------------
    # The tokenizer first: what it makes of the data, and how much memory the run will need,
    # are known before the model is loaded.
    config = model_config(args.model)
    tokenizer = load_tokenizer(args.model)
    added = grow_tokenizer(args, tokenizer)
    max_length = context_length(args, config, task)
    report = data_report(train_examples, tokenizer, task, max_length, args.truncate)
    say(format_report(report))
    if args.data_report:
        return 0
    estimate = check_memory(args, config, task, report, quant, lora, len(names or ()), device, say)
    model = load_model(args.model, labels=names, device=device, quantize=quant, new_head=args.new_head)
    labels = model.config.labels if task == "classify" else None      # the head's order of the labels
    new_tokens = grow_embedding(args, model, tokenizer, added, say)
    check_tokenizer_fits(model, tokenizer, args.model)
    quantization = quantization_report(model, args, task, train_examples, tokenizer, device, say) if quant else None
    if lora:    # freeze the model, train small adapters beside its linear layers (and the new tokens' rows)
        lora = dataclasses.replace(lora, trainable_tokens=tuple(new_tokens))
        add_lora(model, lora)
    if args.freeze:
        freeze(model, args.freeze)
    if args.grad_checkpointing:
        getattr(model, "bert", model).gradient_checkpointing = True

    # 3. Tokenize ------------------------------------------------------------------------------
    # Examples keep their own length; each batch is padded to its longest one (the chapter pads
    # everything to 512, which spends most of the compute on padding for short texts).
    train_ids, train_labels, too_long = tokenize(train_examples, tokenizer, task, max_length, labels, args)
    val_ids, val_labels, _ = tokenize(val_examples, tokenizer, task, max_length, labels, args)
    check_something_to_learn(task, train_ids, val_ids, world)
    say(f"data: {len(train_examples)} training and {len(val_examples)} validation examples, {sum(map(len, train_ids)):,} training tokens"
        + (f", labels {labels}" if labels else "")
        + (f"; {too_long} examples longer than {max_length} tokens were " + ("split into windows" if task == "lm" else "truncated") if too_long else ""))
    class_weights = balanced_class_weights(train_labels, len(labels), device) if args.class_weights == "balanced" else None
    say(padding_note(train_ids, args))
    lengths = [len(ids) for ids in train_ids] if args.group_by_length else None
    first_batch = make_batch(task, train_ids, train_labels, batch_order(len(train_ids), args.batch_size, args.seed, 0, lengths=lengths)[0],
                             tokenizer.pad_id, "cpu")
    if args.show_batch or args.dry_run:                      # the batch as the model sees it; nothing is trained or written
        notes = batch_notes(first_batch, tokenizer, task, report["lengths"]["longer"], max_length, report["lengths"]["tokens_beyond"],
                            args.pack, args.truncate)
        say(show_batch(first_batch, tokenizer, task, args.show_batch or 2, labels, notes=notes))
        return 0

    # 4. The optimizer and the learning-rate schedule -------------------------------------------
    # AdamW: Adam with weight decay applied to the weights directly, not through the gradient, so
    # that Adam's per-weight scaling does not weaken it (see nanotune/optim.py for what decays).
    # 5e-5: small, because the pre-trained weights are already good; large steps would erase them.
    own_memory(p for p in model.parameters() if p.requires_grad)   # trained weights leave the checkpoint file (before DDP sees them)
    train_model = distributed.wrap(model, device, args.fsdp) if world > 1 else model
    optimizer = make_optimizer(model, args.lr, args.weight_decay, lr_decay=args.lr_decay)
    may_train = [(n, p) for n, p in model.named_parameters() if p.requires_grad]   # for gradual unfreezing
    if args.lr_decay or args.show_groups:
        say(format_groups(optimizer, args.lr))
        if args.show_groups:
            return 0
    steps_per_epoch = math.ceil(math.ceil(len(train_ids) // world / args.batch_size) / args.grad_accum)
    total_steps = steps_per_epoch * args.epochs
    trainable, total = sum(p.numel() for p in model.parameters() if p.requires_grad), parameter_count(model)
    say(f"model: {args.model} ({task}), {trainable:,} of {total:,} parameters trainable ({trainable / total:.2%}),"
        f" {footprint_bytes(model) / 2**20:,.1f} MiB in memory (fp32: {total * 4 / 2**20:,.1f} MiB), on {device}"
        f" ({'bf16 autocast' if args.bf16 else 'fp32'});"
        f" {args.epochs} epochs of {steps_per_epoch} steps" + (f" on each of {world} ranks" if world > 1 else ""))
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    output_weight = model.lm_head.weight if task == "lm" and not args.fsdp else None   # FSDP keeps it sharded

    def compute_loss(model, batch):
        with autocast():
            return loss_sum(model, batch, task, class_weights, args.label_smoothing, output_weight)

    # Everything is checked: only now does the run take --out, and resume where it stopped.
    out = Path(args.out)
    progress = take_output_folder(out, start, model, optimizer, args, main_process, say)
    if quantization and main_process:
        write_json(quantization, out / "quantization.json")
    log = MetricsLog(out, enabled=main_process)
    if main_process and importlib.util.find_spec("matplotlib") is None:
        say("note: pip install matplotlib to get OUT/training.png, the loss, learning rate and gradient norm drawn after every epoch")
    if args.lr_find:
        return find_learning_rate(args, model, train_model, optimizer, compute_loss, task, train_ids, train_labels, val_ids, val_labels,
                                  tokenizer, device, autocast, labels, out, say)
    stop = StopSignals()                                     # Ctrl-C / SIGTERM: finish the step, save, stop

    # 5. Fine-tune, in a plain epoch loop ------------------------------------------------------
    model.train()                                            # dropout on
    step = progress["step"]
    for epoch in range(progress["epoch"], args.epochs):
        if args.unfreeze == "gradual":
            lowest = unfreeze_gradually(model, may_train, epoch)
            say(f"epoch {epoch + 1}: training " + ("everything" if lowest == 0 else f"from block {lowest - 1} up" if lowest <= layers_of(model) else "the head only"))
        # A new order of the examples every epoch, the same for the same seed (and after a resume).
        # Each batch is padded to its longest example; --group-by-length puts examples of similar
        # length together, so that less of the compute goes to padding.
        batches = batch_order(len(train_ids), args.batch_size, args.seed, epoch, rank=rank, world=world, lengths=lengths)
        steps = [batches[i:i + args.grad_accum] for i in range(0, len(batches), args.grad_accum)]
        first = progress["step_in_epoch"] if epoch == progress["epoch"] else 0
        bar = tqdm(range(first, len(steps)), desc=f"epoch {epoch + 1}/{args.epochs}", total=len(steps), initial=first,
                   dynamic_ncols=True, disable=not main_process)
        running = RunningLoss(device)
        for step_in_epoch in bar:
            # Warm-up (--warmup-steps; the chapters use 100 and 500): the first steps' gradients come
            # from a head and optimizer state that know nothing yet, and a rate that starts small and
            # grows keeps them from jolting the pre-trained weights. Then the rate decays to 0.
            lr = lr_at(step, args.lr, args.warmup_steps, total_steps, args.lr_schedule)
            micro_batches = [make_batch(task, train_ids, train_labels, idx, tokenizer.pad_id, device) for idx in steps[step_in_epoch]]
            summed, count, norm = train_step(train_model, micro_batches, optimizer, lr, compute_loss, args.max_grad_norm, device)
            step += 1
            running.add(summed, count, micro_batches, norm, args.max_grad_norm)
            if step % 10 == 0 or step_in_epoch == len(steps) - 1:   # reading the loss waits for the device: not every step
                report_training(running, bar, log, epoch, step, lr, device)
            if stop.requested(device):
                bar.close()
                where = progress | {"epoch": epoch, "step_in_epoch": step_in_epoch + 1, "step": step}
                return save_and_stop(out, model, optimizer, where, args, main_process, say, stop.received)
        bar.close()

        # 6. Evaluate on held-out data, and keep the best epoch ------------------------------------
        progress.update(epoch=epoch + 1, step_in_epoch=0, step=step)
        improved = True
        if val_ids:
            scores = evaluate(train_model, task, val_ids, val_labels, args.batch_size, tokenizer.pad_id, device, autocast, len(labels or ()))
            log.log("eval", epoch=epoch + 1, step=step, **scores)
            log.plot()
            say(f"epoch {epoch + 1}: " + ", ".join(f"validation {k} {v:.4f}" for k, v in scores.items()))
            improved = scores["loss"] < progress["best"]
            progress.update(best=min(progress["best"], scores["loss"]), bad_epochs=0 if improved else progress["bad_epochs"] + 1)

        # 7. Save: the model first, then the state to resume from (a kill between the two redoes this epoch)
        if improved:
            save_model(model, tokenizer, out, lora, args, main_process)
        save_state(out / "checkpoint", model, optimizer, progress, sharded=args.fsdp)   # every rank: a barrier, and FSDP's shards
        if args.patience is not None and progress["bad_epochs"] >= args.patience:
            say(f"early stop: no better validation loss for {args.patience} epochs")
            break
        if args.stop_after_epochs is not None and epoch + 1 >= args.stop_after_epochs and epoch + 1 < args.epochs:
            say(f"stopped after epoch {epoch + 1} as asked: continue with the same command plus --resume")
            return 0

    distributed.shutdown()
    if lora and args.merge and main_process:   # the best adapter, folded into the weights it was trained against
        load_trained = lambda: load_adapter(load_model(args.model, labels=labels, device=device, quantize=quant, new_head=args.new_head), out)
        merged = merge_lora(load_trained())
        merged.save_pretrained(out / "merged")
        tokenizer.save(out / "merged")
        say(f"merged model: {out / 'merged'}/")
        if quantization and val_ids:
            # Merging folds the adapter into de-quantized weights: not quite the model that was trained.
            evaluate_ = lambda m: evaluate(m, task, val_ids, val_labels, args.batch_size, tokenizer.pad_id, device, autocast, len(labels or ()))
            quantization["merge"] = merge_drift(load_trained(), merged, make_batch(task, val_ids, val_labels, list(range(min(8, len(val_ids)))), tokenizer.pad_id, device), evaluate_)
            write_json(quantization, out / "quantization.json")
            d = quantization["merge"]
            say(f"merging moved the logits by up to {d['max_logit_difference']:.4f}; validation loss {d['trained']['loss']:.4f} (quantized base + adapter),"
                f" {d['merged']['loss']:.4f} (merged)")
    if log.plot():
        say(f"training plot: {out / 'training.png'}")
    measured = memory.measured_peak(device)
    say(f"memory: peak {measured / memory.MiB:,.0f} MiB measured, {estimate['total'] / memory.MiB:,.0f} MiB estimated"
        f" ({(estimate['total'] - measured) / measured:+.0%})")
    log.log("memory", measured_mib=round(measured / memory.MiB), estimated_mib=round(estimate["total"] / memory.MiB),
            error=round((estimate["total"] - measured) / measured, 4),
            estimate={k: round(v / memory.MiB, 1) for k, v in estimate.items()})
    say(f"saved the best model (validation loss {progress['best']:.4f}) to {out}/" if val_ids else f"saved the model to {out}/")
    return 0


if __name__ == "__main__":
    run(main, parse_args)
