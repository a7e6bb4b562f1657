"""The batch as the model sees it (`train.py --show-batch`): every position's token, its id, the
attention mask and what the loss scores there, and in plain words what is easy to get wrong."""
from .. import preference
from ..data import batch_order, make_batch
from ..losses import IGNORE, next_token_labels
from ..run.cli import use_colour

GREEN, DIM, RESET = "\x1b[32m", "\x1b[2m", "\x1b[0m"


def token_text(tokenizer, token_id):
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    return repr(text)[1:-1] if text.strip() == text and text else repr(text)


def show_batch(batch, tokenizer, task, n, label_names=None, colour=None, notes=(), context_only=()):
    """Text: the first `n` examples of `batch`, a row per position, and what to watch out for.
    `context_only`: per example, the token spans of answers the render check left unscored."""
    colour = use_colour() if colour is None else colour
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    n = min(n, ids.shape[0])
    lines = []
    if task == "lm":
        targets = next_token_labels(labels)                     # position t is scored on token t + 1
        lines.append("language modelling: the model reads the tokens, and at each position the loss scores"
                     " its guess of the NEXT token (the labels shifted one place left); padding and the last"
                     " position score nothing.")
    for b in range(n):
        real = int(mask[b].sum()) if mask is not None else ids.shape[1]
        lines += ["", f"example {b + 1} of the first batch ({real} tokens"
                  + (f", {ids.shape[1] - real} of padding to the batch's longest)" if real < ids.shape[1] else ")")]
        if task == "classify":
            label = int(labels[b])
            lines.append(f"label: {label_names[label] if label_names else label} (id {label}); the loss scores the"
                         " prediction made from the [CLS] position only")
        scored = "scored on (the next token)" if task == "lm" else ""
        lines.append(f"  {'pos':>4}  {'token':<20}{'id':>8}{'mask':>6}  {scored}")
        for t in range(ids.shape[1]):
            m = int(mask[b, t]) if mask is not None else 1
            cells = f"  {t:>4}  {token_text(tokenizer, int(ids[b, t]))[:19]:<20}{int(ids[b, t]):>8}{m:>6}  "
            if task == "lm":
                target = int(targets[b, t])
                scored = target != IGNORE
                served = not any(a <= t + 1 <= z for a, z in (context_only[b] if b < len(context_only) else ()))
                what = (f"{token_text(tokenizer, target)} ({target})" if scored else "not scored" if served else
                        "! not scored: this answer is rendered otherwise at serving (context only)")
                row = cells + ("* " if scored else "  ") + what
                lines.append((GREEN + row + RESET if scored else DIM + row + RESET) if colour else row)
            else:
                lines.append(cells if m or not colour else DIM + cells + RESET)
    if task == "lm" and not colour:
        lines.append("\n(* marks a scored position)")
    if notes:
        lines += ["", "what to watch:"] + [f"- {note}" for note in notes]
    return "\n".join(lines)


def batch_notes(batch, tokenizer, task, too_long, max_length, lost_tokens, packed, truncation):
    """Plain-words warnings about the data as batched."""
    notes = []
    labels = batch["labels"]
    if task == "lm":
        targets = next_token_labels(labels)
        empty = [i + 1 for i in range(targets.shape[0]) if not bool((targets[i] != IGNORE).any())]
        if empty:
            notes.append(f"examples {empty} have no scored token (a single token, with nothing after it to predict)")
        if tokenizer.pad_id == tokenizer.eos_id:
            eos_scored = int((targets == tokenizer.eos_id).sum())
            notes.append(f"this tokenizer has no padding token, so padding uses the end-of-text token (id"
                         f" {tokenizer.eos_id}); nanotune tells padding apart by the attention mask, not by the id, so"
                         f" each text's own end-of-text token is still scored ({eos_scored} in this batch), and the"
                         " model learns where a text stops. (Setting the labels to -100 wherever the id is the"
                         " padding id would silently drop them all.)")
        if packed:
            ends = int((batch["input_ids"] == tokenizer.eos_id).sum())
            notes.append(f"--pack: texts are joined into blocks, an end-of-text token between them ({ends} in this"
                         " batch); a text may start mid-block and attend to the text before it, and a block's first"
                         " token is not scored")
        if too_long:
            notes.append(f"{too_long} texts are longer than --max-length {max_length}: they are cut into windows (no"
                         " token is lost, but a window's first tokens see no context from the one before it unless"
                         " --stride overlaps them)")
    else:
        if too_long:
            notes.append(f"{too_long} examples are longer than --max-length {max_length} and were truncated"
                         f" ({truncation}): {lost_tokens:,} tokens the model never sees (see --truncate)")
    return notes


def show_first_batch(args, run, tokenizer, sequences, labels, label_names, report, max_length):
    """--show-batch and --dry-run: the first batch of the first epoch as the model sees it, and what
    to watch for. Prints; returns train.py's exit status."""
    lengths = [len(ids) for ids in sequences] if args.group_by_length else None
    first = batch_order(len(sequences), args.batch_size, args.seed, 0, lengths=lengths)[0]
    batch = make_batch(preference.batch_kind(run.task), sequences, labels, first, tokenizer.pad_id, "cpu")
    longer, beyond = report["lengths"]["longer"], report["lengths"]["tokens_beyond"]
    if run.task in preference.TASKS:        # preference pairs: language-model rows, two a pair
        notes = [f"preference pairs: rows 1-{len(first)} are the prompts with their chosen answers, rows"
                 f" {len(first) + 1}-{2 * len(first)} the same prompts with the rejected ones; only the answers are"
                 " scored (their summed log-probability is what DPO compares)"]
        notes += [f"{longer} pairs have an answer cut to fit --max-length {max_length}"] if longer else []
        run.print(show_batch(batch, tokenizer, "lm", args.show_batch or 2, notes=notes))
        return 0
    notes = batch_notes(batch, tokenizer, run.task, longer, max_length, beyond, args.pack, args.truncate)
    context_only = [getattr(sequences[i], "context_only", ()) for i in first]
    if any(context_only):
        notes.append(f"{sum(map(len, context_only))} answers in this batch (marked !) are rendered differently in"
                     " training than the server will prompt for them (their chat template changes earlier turns):"
                     " they stay as context, unscored")
    run.print(show_batch(batch, tokenizer, run.task, args.show_batch or 2, label_names, notes=notes,
                         context_only=context_only))
    return 0
