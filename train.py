"""Fine-tune a pre-trained model: GPT-2 or a Llama-family model as a language model (on plain text or
on conversations), or BERT as a classifier.

    python train.py --data data/anecdotes_jokes.txt                      # GPT-2, causal LM
    python train.py --model sentence-transformers/all-MiniLM-L6-v2 \\
        --data data/sentiment_train.csv --val-data data/sentiment_val.csv   # BERT, classification

`main` takes the chapter's steps in order: load the data, the tokenizer and the pre-trained model;
tokenize; make AdamW and its schedule; then `fit` trains in a plain epoch loop (`train_step` is one
optimizer step), evaluates after every epoch and saves. Everything a run needs is read and checked
before anything is written. `python train.py --help` lists every option (nanotune/run/train_flags.py).
"""
import math
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from nanotune import NanotuneError, load_tokenizer, preference, rl, tricks
from nanotune.chat import read_tools, render_conversations
from nanotune.data import (batch_order, check_something_to_learn, fit_conversations, lm_sequences, make_batch, mix,
                           pack, pack_examples, read_examples, split, truncate)
from nanotune.evaluate import evaluate
from nanotune.hub import resolve
from nanotune.lora import add_lora, save_adapter
from nanotune.losses import balanced_class_weights, causal_lm_loss_sum, classification_loss, scored_count
from nanotune.models import check_tokenizer_fits, load_model, model_config
from nanotune.new_tokens import grow_embedding, grow_tokenizer
from nanotune.optim import format_groups, freeze, layers_of, lr_at, make_optimizer, unfreeze_gradually
from nanotune.quantize import quantize_linears
from nanotune.run import distributed, memory
from nanotune.run.checkpoint import Saver, StopSignals, saves_in_background
from nanotune.run.cli import run as run_command
from nanotune.run.metrics import MetricsLog, RunningLoss, describe_data, describe_model, report_training
from nanotune.run.output import take
from nanotune.run.train_flags import check_flags, context_length, parse_args, parser, start
from nanotune.tools import batch_view, lm_eval, lr_find, quantization_error, search
from nanotune.tools.data_report import data_report, format_report


def main(args):
    if args.search or args.trials:                 # several short runs of this script, ranked by validation loss
        return search.run(args, parser(), check=check_inputs)
    run = start(args)             # device, ranks, precision; every flag checked, with --out; nothing written
    if args.reward:                                # learning from rewards (GRPO): its own loop, nanotune/rl.py
        return rl.train(args, run)

    # 1. The data. (Before the model, unlike chapter 1: a classifier's head is sized by its labels.)
    train_examples, val_examples, label_names = load_data(args, run.task)

    # 2. The tokenizer and the pre-trained model. The tokenizer first: what it makes of the data,
    # and how much memory the run will need, are known before the weights are loaded.
    tokenizer = load_tokenizer(args.model)
    added = grow_tokenizer(tokenizer, args.add_tokens)
    render = preference.render_pairs if run.task in preference.TASKS else chat_renderer(args)
    template = render(train_examples, val_examples, tokenizer, args.model, args.chat_template,
                      args.train_on)                              # conversations: the model's own template
    config = model_config(args.model)
    max_length = context_length(args, config, run.task)
    report = data_report(train_examples, tokenizer, run.task, max_length, args.truncate)
    run.print(format_report(report))
    if args.data_report:
        return 0
    estimate = memory.check(args, run, config, report, len(label_names or ()))   # a run that will not fit stops
    model = load_pretrained(args, run, label_names)          # --quantize: its linear layers in 8 or 4 bits
    quantization = adapt(args, run, model, tokenizer, added, train_examples)

    # 3. Tokenize: every example keeps its own length, and each batch is padded to its longest one
    # (the chapter pads everything to 512, which spends most of the compute on padding).
    labels = model.config.labels if run.task == "classify" else None       # the head's order of the labels
    train_ids, train_labels, too_long = tokenize(train_examples, tokenizer, run.task, max_length, labels, args,
                                                 template, run.print)
    val_ids, val_labels, _ = tokenize(val_examples, tokenizer, run.task, max_length, labels, args, template, run.print,
                                      "validation")
    check_something_to_learn(run.task, train_ids, val_ids, run.world)
    run.print(describe_data(args, train_examples, val_examples, train_ids, labels, too_long, max_length, run.task))
    if args.show_batch or args.dry_run:           # the first batch as the model sees it; nothing trained or written
        return batch_view.show_first_batch(args, run, tokenizer, train_ids, train_labels, labels, report, max_length)
    if run.task in preference.TASKS:              # DPO's reference, from the weights before any step; a reward head
        preference.prepare(model, run, train_ids + val_ids, args.batch_size, tokenizer.pad_id)

    # 4. AdamW and the learning-rate schedule (lr_at, in fit). AdamW: Adam with the weight decay
    # applied to the weights directly, not through the gradient, so that Adam's per-weight scaling
    # does not weaken it (nanotune/optim.py says what decays). 5e-5: small, because the pre-trained
    # weights are already good, and large steps would erase what pre-training learned.
    train_model = distributed.wrap(model, run.device, args.fsdp) if run.world > 1 else model    # DDP or FSDP
    optimizer = make_optimizer(model, args.lr, args.weight_decay, lr_decay=args.lr_decay, kind=args.optim)
    if args.lr_decay or args.show_groups:
        run.print(format_groups(optimizer, args.lr))
    if args.show_groups:
        return 0

    # Everything is checked: only now does the run take --out (and, resumed, load where it stopped).
    progress = take(args, run, model, optimizer, training=not args.lr_find, records={"quantization.json": quantization})
    data = (train_ids, train_labels, val_ids, val_labels)
    if args.lr_find:                                # the LR range test instead of training; nothing is kept
        return find_learning_rate(args, run, model, train_model, optimizer, tokenizer, data)

    # 5.-7. Train, evaluate and save, epoch by epoch; stopped on purpose (Ctrl-C, --stop-after-epochs), resumably.
    stopped = fit(args, run, model, train_model, optimizer, tokenizer, progress, data)
    if stopped is not None:
        return stopped
    finish(args, run, model, tokenizer, data, quantization, estimate, progress)
    return lm_eval.after_training(args, run, template is not None) if args.lm_eval else 0   # 8. lm-eval's scores


# ---- 1.-3. the data, the model, the tokens ------------------------------------------------------

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


def load_pretrained(args, run, labels):
    """The pre-trained model; with --quantize (QLoRA's frozen base), each of its linear layers swapped
    for an 8- or 4-bit one (nanotune/quantize.py): the whole model loaded, then each layer swapped.
    Its twin, the quantize_in_pieces trick, swaps each layer as soon as it is loaded, so that the
    full-precision model never exists whole (tricks.quantize_while_loading)."""
    load = lambda **q: load_model(args.model, labels=labels, device=run.device, new_head=args.new_head, **q)
    if run.quant and tricks.enabled("quantize_in_pieces"):
        return load(quantize=run.quant)
    model = load()
    return quantize_linears(model, run.quant) if run.quant else model


def adapt(args, run, model, tokenizer, added, train_examples):
    """The model made ready to train: rows for new tokens, what quantizing cost it (returned, for
    OUT/quantization.json), LoRA adapters, frozen layers, gradient checkpointing."""
    new_tokens = grow_embedding(model, tokenizer, added, args.pad_vocab_to_multiple_of, run.print)
    check_tokenizer_fits(model, tokenizer, args.model)
    quantization = None
    if run.quant:       # what quantizing cost each layer, against the checkpoint's own weights
        texts = [e["text"] for e in train_examples[:8]]
        quantization = quantization_error.report(model, resolve(args.model), args.quantize, args.quant_type,
                                                 args.double_quant, texts, tokenizer, model.config.context, run.device,
                                                 run.print)
    if run.lora:        # freeze the model, train small adapters beside its linear layers (and new tokens' rows)
        run.lora.trainable_tokens = tuple(new_tokens)
        add_lora(model, run.lora)
    if args.freeze:
        freeze(model, args.freeze)
    if args.grad_checkpointing:
        getattr(model, "bert", model).gradient_checkpointing = True
    return quantization


def tokenize(examples, tokenizer, task, max_length, labels, args, template=None, say=print, name="training"):
    """Token ids per example and their labels: for a language model the ids themselves (the loss
    shifts them: position t predicts token t + 1), -100 where a token is not scored (context only,
    or a conversation's questions); for a classifier the label's id. Also how many texts were longer
    than `max_length`: never dropped silently (LM texts are cut into windows, classification texts
    and conversations truncated; a conversation with no answer token left is left out, and `say`s so)."""
    if task in preference.TASKS:                     # pairs: the prompt, then each answer (preference.py)
        return preference.tokenize_pairs(examples, tokenizer, max_length)
    if examples and "messages" in examples[0]:       # conversations, through the model's chat template
        pairs = [e["tokens"] for e in examples]     # rendered and checked turn by turn (render_conversations)
        sequences, targets, too_long = fit_conversations(pairs, examples, max_length, name, say)
        if args.pack:                                # whole conversations side by side, none seeing another
            return (*pack_examples(sequences, targets, max_length), too_long)
        return sequences, targets, too_long
    ids = tokenizer.encode_batch([e["text"] for e in examples])
    if task == "lm":
        if args.pack:
            return pack(ids, max_length, tokenizer.eos_id), None, 0
        return lm_sequences(ids, max_length, tokenizer.eos_id, args.stride)
    unknown = sorted({e["label"] for e in examples} - set(labels))
    if unknown:
        raise NanotuneError(f"labels never seen in training: {', '.join(unknown)}; the model knows {', '.join(labels)}")
    too_long = sum(len(s) > max_length for s in ids)
    sequences = [truncate(s, max_length, args.truncate) for s in ids]
    return sequences, [labels.index(e["label"]) for e in examples], too_long


def chat_renderer(args):
    """render_conversations with --tools's definitions and --enable-thinking's switch."""
    return partial(render_conversations, tools=read_tools(args.tools), thinking=args.enable_thinking)


def check_inputs(args):
    """A single run's checks, without loading the weights or writing anything: the flags, the data,
    the model's config and tokenizer, what tokenizing leaves, and --out against every input.
    Returns what starting in --out means. A search runs it for every trial before its first write."""
    kind, task, quant, lora, start_mode = check_flags(args)
    train_examples, val_examples, label_names = load_data(args, task)
    tokenizer = load_tokenizer(args.model)
    grow_tokenizer(tokenizer, args.add_tokens)
    render = preference.render_pairs if task in preference.TASKS else chat_renderer(args)
    template = render(train_examples, val_examples, tokenizer, args.model, args.chat_template, args.train_on)
    max_length = context_length(args, model_config(args.model), task)
    quiet = lambda message: None                   # the run itself says it
    train_ids = tokenize(train_examples, tokenizer, task, max_length, label_names, args, template, quiet)[0]
    val_ids = tokenize(val_examples, tokenizer, task, max_length, label_names, args, template, quiet, "validation")[0]
    check_something_to_learn(task, train_ids, val_ids, 1)
    return start_mode


# ---- 5.-7. the loop: train, evaluate, save --------------------------------------------------------

def fit(args, run, model, train_model, optimizer, tokenizer, progress, data):
    """Chapter 1's loop, epoch by epoch: train on every batch, evaluate on held-out data, save the
    best model. Returns None when training is done, or the exit status of a run stopped on purpose
    (Ctrl-C, SIGTERM, --stop-after-epochs), which --resume continues exactly."""
    train_ids, train_labels, val_ids, val_labels = data
    out, task, device = Path(args.out), run.task, run.device
    labels = model.config.labels if task == "classify" else None
    loss_options = loss_settings(args, task, train_labels, labels, device)
    rows = preference.batch_kind(task)                       # the batches' kind: pairs for DPO and a reward model
    lengths = [len(ids) for ids in train_ids] if args.group_by_length else None
    steps_per_epoch = math.ceil(math.ceil(len(train_ids) // run.world / args.batch_size) / args.grad_accum)
    total_steps = steps_per_epoch * args.epochs
    describe_model(args, run, model, steps_per_epoch, total_steps)
    log = MetricsLog(out, enabled=run.main_process)
    may_train = [(n, p) for n, p in model.named_parameters() if p.requires_grad]   # for gradual unfreezing
    stop = StopSignals()                                     # Ctrl-C / SIGTERM: finish the step, save, stop
    write_model = lambda weights: save_model(model, tokenizer, out, run.lora, args, run.main_process, weights)
    saver = Saver(out, model, optimizer, write_model, saves_in_background(run, args.epochs), args.fsdp, not run.lora)
    model.train()                                            # dropout on
    step = progress["step"]
    for epoch in range(progress["epoch"], args.epochs):
        if args.unfreeze == "gradual":
            lowest = unfreeze_gradually(model, may_train, epoch)
            run.print(f"epoch {epoch + 1}: training " + ("everything" if lowest == 0 else f"from block {lowest - 1} up"
                                                         if lowest <= layers_of(model) else "the head only"))
        # A new order of the examples every epoch, the same for the same seed (and after a resume).
        # --group-by-length puts examples of similar length together, so that less of the compute
        # goes to padding (each batch is padded to its longest example: data.make_batch).
        batches = batch_order(len(train_ids), args.batch_size, args.seed, epoch, rank=run.rank, world=run.world,
                              lengths=lengths)
        steps = [batches[i:i + args.grad_accum] for i in range(0, len(batches), args.grad_accum)]
        first = progress["step_in_epoch"] if epoch == progress["epoch"] else 0
        bar = tqdm(range(first, len(steps)), desc=f"epoch {epoch + 1}/{args.epochs}", total=len(steps), initial=first,
                   dynamic_ncols=True, disable=not run.main_process)
        running = RunningLoss(device)
        for step_in_epoch in bar:
            # Warm-up (--warmup-steps; the chapters use 100 and 500): the first steps' gradients come
            # from a head and optimizer state that know nothing yet, and a rate that starts small and
            # grows keeps them from jolting the pre-trained weights. Then the rate decays to 0.
            lr = lr_at(step, args.lr, args.warmup_steps, total_steps, args.lr_schedule)
            micro_batches = [make_batch(rows, train_ids, train_labels, indices, tokenizer.pad_id, device,
                                        model.config.context) for indices in steps[step_in_epoch]]
            summed, count, norm = train_step(train_model, micro_batches, optimizer, lr, task, args.max_grad_norm,
                                             device, run.autocast, **loss_options)
            step += 1
            running.add(summed, count, micro_batches, norm, args.max_grad_norm)
            if step % 10 == 0 or step_in_epoch == len(steps) - 1:   # reading the loss waits for the device
                report_training(running, bar, log, epoch, step, lr, device)
            if stop.requested(device):
                bar.close()
                where = progress | {"epoch": epoch, "step_in_epoch": step_in_epoch + 1, "step": step}
                return saver.stop(where, stop.received, run.print)
        bar.close()

        # 6. Evaluate on held-out data, and keep the best epoch.
        progress.update(epoch=epoch + 1, step_in_epoch=0, step=step)
        improved = True
        if val_ids:
            scores = validation(args, run, tokenizer, data, labels)(train_model)
            log.log("eval", epoch=epoch + 1, step=step, **scores)
            log.plot()
            run.print(f"epoch {epoch + 1}: " + ", ".join(f"validation {k} {v:.4f}" for k, v in scores.items()))
            improved = scores["loss"] < progress["best"]
            progress.update(best=min(progress["best"], scores["loss"]),
                            bad_epochs=0 if improved else progress["bad_epochs"] + 1)

        # 7. Save the model if it improved, then the state to resume from (nanotune/run/checkpoint.py).
        early_stop = args.patience is not None and progress["bad_epochs"] >= args.patience
        stop_here = args.stop_after_epochs is not None and epoch + 1 >= args.stop_after_epochs
        saver.save(improved, progress, last=early_stop or stop_here or epoch + 1 == args.epochs)
        if early_stop:
            run.print(f"early stop: no better validation loss for {args.patience} epochs")
            break
        if stop_here and epoch + 1 < args.epochs:
            run.print(f"stopped after epoch {epoch + 1} as asked: continue with the same command plus --resume")
            return 0
    return None


def loss_sum(model, batch, task, class_weights=None, label_smoothing=0.0, **preference_options):
    """The forward pass and the loss, summed over the batch's scored tokens (LM) or examples
    (classification): the logits, then the loss over them (nanotune/losses.py)."""
    if task in preference.TASKS:                       # pairs of answers: DPO, a reward model (nanotune/preference.py)
        return preference.loss_sum(model, batch, task, label_smoothing=label_smoothing, **preference_options)
    if task == "lm" and tricks.enabled("chunked_loss") and tricks.chunks_the_loss(model):
        return tricks.chunked_lm_loss_sum(model, batch)                # the same sum, never all the logits at once
    if task == "lm":
        logits = model(batch["input_ids"], batch["attention_mask"], batch.get("position_ids"))   # (B, T, vocab)
        return causal_lm_loss_sum(logits, batch["labels"])[0]
    logits = model(batch["input_ids"], batch["attention_mask"])                                  # (B, labels)
    return classification_loss(logits, batch["labels"], class_weights, label_smoothing) * batch["labels"].numel()


def loss_settings(args, task, train_labels, labels, device):
    """loss_sum's options: --class-weights balanced (from the training labels), --label-smoothing, and
    preference tuning's --beta and --dpo-loss."""
    weights = balanced_class_weights(train_labels, len(labels), device) if args.class_weights else None
    return dict(class_weights=weights, label_smoothing=args.label_smoothing, **preference.loss_options(args, task))


def train_step(model, micro_batches, optimizer, lr, task, max_grad_norm, device, autocast=nullcontext, **loss_options):
    """One optimizer step: chapter 1's forward, loss, backward, step and zero_grad, with gradient
    clipping and accumulation over micro-batches. `loss_options` go to loss_sum (class weights, label
    smoothing); `autocast` gives bf16 products where the hardware has them. Returns the summed loss,
    what it sums over, and the gradient's norm before clipping (None without clipping, or no step)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)         # the schedule's rate (a share of it, per depth)
    # The loss is a mean over every scored token of the whole step, not of each micro-batch: each
    # micro-batch's sum is divided by the step's count (losses.causal_lm_loss_sum: SUM, then divide).
    count = sum(scored_count(batch) for batch in micro_batches)
    divisor = distributed.loss_divisor(count, device)        # in one process: count
    total = torch.zeros((), device=device)
    if divisor == 0:              # nothing to score on any rank (a window of one token): no mean, no step
        return total, 0, None
    for i, batch in enumerate(micro_batches):
        with distributed.gradient_sync(model, i == len(micro_batches) - 1):
            with autocast():
                summed = loss_sum(model, batch, task, **loss_options)     # forward pass and loss
        (summed / divisor).backward()                         # gradients add up over micro-batches
        total += summed.detach()
    norm = clip_and_step(optimizer, [p for p in model.parameters() if p.grad is not None], max_grad_norm)
    optimizer.zero_grad(set_to_none=True)                     # set_to_none: the next backward writes afresh
    return total, count, norm


def clip_and_step(optimizer, params, max_grad_norm):
    """Clip the gradient's norm to `max_grad_norm` (0: no clipping), then AdamW's step. Returns the
    norm before clipping (None without clipping)."""
    if max_grad_norm > 0 and tricks.enabled("clip_in_adamw") and tricks.clips_inside_adamw(optimizer):
        return tricks.clip_inside_adamw(optimizer, params, max_grad_norm)    # the same two lines, one pass fewer
    norm = None
    if max_grad_norm > 0:
        # One odd batch can give a huge gradient; clipping its norm to 1.0 keeps a single step from
        # undoing what pre-training learned.
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    return norm


def validation(args, run, tokenizer, data, labels):
    """The validation scores of a model: `evaluate` with the run's batches and precision."""
    _, _, val_ids, val_labels = data
    if run.task in preference.TASKS:                  # the held-out pairs' loss and rewards
        return lambda model: preference.evaluate_pairs(model, val_ids, args.batch_size, tokenizer.pad_id, run.device,
                                                       run.autocast, task=run.task,
                                                       label_smoothing=args.label_smoothing,
                                                       **preference.loss_options(args, run.task))
    return lambda model: evaluate(model, run.task, val_ids, val_labels, args.batch_size, tokenizer.pad_id, run.device,
                                  len(labels or ()), run.autocast)


def save_model(model, tokenizer, out, lora, args, main_process, weights=None):
    """The model in the Hub layout (or the LoRA adapter in PEFT's), and its tokenizer. `weights`:
    copies of the model's tensors to write instead of its own (background saving)."""
    if weights is None:
        weights = distributed.full_state_dict(model, args.fsdp)      # FSDP: every rank hands in its shard
    if main_process:
        weights = preference.save_score_head(model, out, weights, lora)    # a reward model's head: a file of its own
        save_adapter(model, out, lora, args.model, weights) if lora else model.save_pretrained(out, state_dict=weights)
        tokenizer.save(out)


def finish(args, run, model, tokenizer, data, quantization, estimate, progress):
    """After the last epoch: the merged model (--merge), the plot, the memory report."""
    distributed.shutdown()
    out, log = Path(args.out), MetricsLog(Path(args.out), enabled=run.main_process)
    _, _, val_ids, val_labels = data
    if run.lora and args.merge and run.main_process:   # the best adapter, folded into the weights it trained with
        labels = model.config.labels if run.task == "classify" else None
        first = make_batch(preference.batch_kind(run.task), val_ids, val_labels, list(range(min(8, len(val_ids)))),
                           tokenizer.pad_id, run.device) if val_ids else None
        quantization_error.save_merged(args, run, labels, tokenizer, quantization, first,
                                       validation(args, run, tokenizer, data, labels))
    if log.plot():
        run.print(f"training plot: {out / 'training.png'}")
    memory.report_peak(estimate, run.device, log, run.print)
    best = f"the best model (validation loss {progress['best']:.4f})" if val_ids else "the model"
    run.print(f"saved {best} to {out}/")
    return 0


def find_learning_rate(args, run, model, train_model, optimizer, tokenizer, data):
    """--lr-find (nanotune/tools/lr_find.py), stepping with this file's train_step."""
    train_ids, train_labels, val_ids, val_labels = data
    labels = model.config.labels if run.task == "classify" else None
    loss_options = loss_settings(args, run.task, train_labels, labels, run.device)

    def step(indices, lr):
        batch = make_batch(preference.batch_kind(run.task), train_ids, train_labels, indices, tokenizer.pad_id,
                           run.device)
        summed, count, _ = train_step(train_model, [batch], optimizer, lr, run.task, args.max_grad_norm, run.device,
                                      run.autocast, **loss_options)
        return float(summed) / count if count else None        # None: nothing scored in this batch
    validate = lambda: validation(args, run, tokenizer, data, labels)(train_model) if val_ids else {}
    batches = batch_order(len(train_ids), args.batch_size, args.seed, 0)
    return lr_find.run(model, optimizer, step, batches, validate, Path(args.out), args.lr_find_check, run.print)


if __name__ == "__main__":
    run_command(main, parse_args)
