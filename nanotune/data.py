"""Files -> examples -> token ids -> batches.

Formats: .txt (one example per line), .jsonl (a "text" field, and "label" for classification; or a
conversation: "messages", ShareGPT's "conversations", Alpaca's "instruction" and "output", or
"prompt" and "completion"), .csv / .tsv (a header row naming the text
and label columns). Every batch is padded only to its own longest example; `pack` removes padding
altogether for language modelling.
"""
import csv
import json
import math
from pathlib import Path

import torch

from . import tricks
from .errors import NanotuneError
from .losses import IGNORE
from .tokenizer import pad

DATA_DIR = Path(__file__).resolve().parent.parent / "data"   # the examples shipped with nanotune


def find_data_file(name) -> Path:
    """`name` as given, or else the file of that name in nanotune's data/ folder."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    for candidate in (DATA_DIR / name, DATA_DIR / path.name):
        if candidate.is_file():
            return candidate
    raise NanotuneError(f"data file {name} not found (looked in the current folder and in {DATA_DIR}): check the path")


def _text_lines(path: Path):
    """The file's lines, decoded as UTF-8, with a clear error for binary or mis-encoded files."""
    raw = path.read_bytes()
    if not raw.strip():
        raise NanotuneError(f"data file {path} is empty: give a file with at least one example")
    if b"\0" in raw:
        line = raw[:raw.index(b"\0")].count(b"\n") + 1
        raise NanotuneError(f"data file {path} looks binary (a NUL byte on line {line}): give a UTF-8 text file")
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise NanotuneError(f"data file {path} is not UTF-8 text: line {number} has byte"
                                f" {line[e.start]:#x} at column {e.start + 1}; re-save the file as UTF-8") from None
    return raw.decode("utf-8").removeprefix("\ufeff").splitlines()


def read_examples(path, text_column="text", label_column="label", with_labels=False) -> list:
    """A list of {"text": ..., "label": ...} dicts ("label" only when `with_labels`), or of
    {"messages": [...]} dicts for a .jsonl file of conversations (chat.py)."""
    path = find_data_file(path)
    lines = _text_lines(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise NanotuneError(f"{path} line {number} is not valid JSON ({e.msg}): one JSON object per"
                                    " line") from None
            if not isinstance(row, dict):
                raise NanotuneError(f"{path} line {number} is not a JSON object: one object per line, with a"
                                    f" {text_column!r} field")
            rows.append((f"line {number}", row))
    elif suffix in (".csv", ".tsv"):
        csv.field_size_limit(2**31 - 1)     # a long review is one field: the default limit is 128 KiB
        try:
            reader = csv.DictReader(lines, delimiter="\t" if suffix == ".tsv" else ",")
            rows = [(f"row {n}", row) for n, row in enumerate(reader, start=1)]
        except csv.Error as e:
            raise NanotuneError(f"{path} is not valid {suffix[1:].upper()} ({e}): check its quoting") from None
    elif with_labels:
        raise NanotuneError(f"{path} is plain text, which has no labels: use .jsonl, .csv or .tsv with"
                            f" {text_column!r} and {label_column!r} columns")
    else:
        return [{"text": line} for line in lines if line.strip()]

    if suffix == ".jsonl" and not with_labels and rows and {"chosen", "rejected"} <= rows[0][1].keys():
        from .preference import read_pairs          # preference pairs: a prompt, a chosen and a rejected answer
        return read_pairs(path, rows)
    if suffix == ".jsonl" and not with_labels and rows and (CONVERSATION & rows[0][1].keys()):
        return read_conversations(path, rows)
    wanted = [text_column] + ([label_column] if with_labels else [])
    examples = []
    for where, row in rows:
        absent = [c for c in wanted if row.get(c) in (None, "")]
        if absent:
            have = ", ".join(repr(k) for k in row if k is not None)
            raise NanotuneError(f"{path} {where} has no {' or '.join(map(repr, absent))} (its columns: {have}): "
                                "name the right ones with --text-column / --label-column")
        text, label = row[text_column], row.get(label_column)
        if not isinstance(text, str):
            raise NanotuneError(f"{path} {where}: {text_column!r} is {json.dumps(text)[:40]}, not a string of text:"
                                " every example's text must be a string")
        example = {"text": text}
        if with_labels:
            if isinstance(label, bool) or not isinstance(label, (str, int)):
                raise NanotuneError(f"{path} {where}: {label_column!r} is {json.dumps(label)[:40]}: a label"
                                    " is a name or a whole number")
            example["label"] = str(label).strip()
            if not example["label"]:
                raise NanotuneError(f"{path} {where} has an empty {label_column!r}: give every example a label")
        examples.append(example)
    if not examples:
        raise NanotuneError(f"data file {path} has a header but no examples")
    return examples


CONVERSATION = {"messages", "prompt", "completion", "conversations", "instruction"}   # keys of a conversation line
# ShareGPT's speakers, and the roles they become (OpenAI's names are accepted as they are).
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "tool": "tool",
                  "user": "user", "assistant": "assistant"}


def conversation_format(row):
    """Which conversation format a .jsonl line is written in, or None."""
    return ("messages" if "messages" in row else "ShareGPT" if "conversations" in row else
            "Alpaca" if "instruction" in row else "prompt/completion" if {"prompt", "completion"} <= row.keys()
            else None)


def read_conversations(path, rows):
    """Conversations, in OpenAI's (and the Hub's chat datasets') {"messages": [{"role", "content"},
    ...]} format, or converted to it from the other common ones:
    - a prompt and its completion ({"prompt": "...", "completion": "..."}, as TRL writes them; either
      may also be a list of messages);
    - ShareGPT: {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}]}, the
      speakers human, gpt, system and tool becoming user, assistant, system and tool;
    - Alpaca: {"instruction": "...", "input": "...", "output": "..."}: the instruction, and the input
      below it when there is one, as the user's turn; the output as the answer.
    A line may carry "tools" (tool definitions) for the template. One format a file."""
    from .chat import check_conversation, check_tools
    first = conversation_format(rows[0][1])
    examples = []
    for where, row in rows:
        kind = conversation_format(row)
        if kind != first:
            have = ", ".join(repr(k) for k in row)
            raise NanotuneError(f"{path} {where} is not a {first} conversation like the file's first line (its"
                                f" fields: {have}): keep one format a file")
        messages = as_messages(row, kind, f"{path} {where}")
        example = {"messages": check_conversation(messages, f"{path} {where}"), "where": f"{path.name} {where}"}
        if row.get("tools") is not None:
            example["tools"] = check_tools(row["tools"], f"{path} {where}")
        if kind in ("ShareGPT", "Alpaca"):
            example["converted"] = kind
        examples.append(example)
    return examples


def as_messages(row, kind, where):
    """A line's conversation as a list of messages, whatever its format."""
    if kind == "messages":
        return row["messages"]
    if kind == "prompt/completion":
        as_turns = lambda part, role: part if isinstance(part, list) else [{"role": role, "content": part}]
        return as_turns(row["prompt"], "user") + as_turns(row["completion"], "assistant")
    if kind == "Alpaca":
        for name in ("instruction", "output"):
            if not isinstance(row.get(name), str) or not row[name]:
                raise NanotuneError(f"{where}: an Alpaca line needs a non-empty {name!r} text (its fields:"
                                    f" {', '.join(map(repr, row))})")
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise NanotuneError(f"{where}: 'input' is {json.dumps(extra)[:40]}, not text")
        return [{"role": "user", "content": row["instruction"] + ("\n\n" + extra if extra else "")},
                {"role": "assistant", "content": row["output"]}]
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        raise NanotuneError(f"{where}: 'conversations' must be a non-empty list of {{\"from\", \"value\"}} objects")
    messages = []
    for n, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise NanotuneError(f"{where}: turn {n} of 'conversations' is not an object with 'from' and 'value'")
        if turn["from"] not in SHAREGPT_ROLES:
            raise NanotuneError(f"{where}: turn {n} is from {turn['from']!r}; ShareGPT's speakers are"
                                f" {', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return messages


def fit_conversations(pairs, examples, max_length, name, say):
    """Conversations' ids and labels cut to `max_length`, and how many were cut. A conversation
    learns only from its answers' tokens; one cut before any answer token is scored would teach
    nothing (and a batch of such, with nothing to average over, a 0 / 0). Those are left out and
    named, with the --max-length that keeps them whole; none left is an error, before any write.
    (Position t is scored on token t + 1, so an answer token counts from position 1 on.)"""
    kept, lost, cut = [], [], 0
    for (ids, labels), example in zip(pairs, examples):
        if any(label != IGNORE for label in labels[1:max_length]):
            kept.append((Conversation(ids[:max_length], example.get("affected", ())), labels[:max_length]))
            cut += len(ids) > max_length
        else:
            lost.append((example.get("where", "?"), len(ids)))
    if lost:
        lines = ", ".join(w for w, _ in lost[:10]) + (f" and {len(lost) - 10} more" if len(lost) > 10 else "")
        need = max(n for _, n in lost)
        told = (f"{len(lost)} of {len(pairs)} {name} conversations have no answer token within --max-length"
                f" {max_length} ({lines}); --max-length {need} would keep them whole")
        if not kept:
            raise NanotuneError(f"{told}: no {name} conversation is left: raise --max-length or shorten the prompts")
        say(f"note: {told}; they are left out, as nothing of them would be learned")
    return [ids for ids, _ in kept], [labels for _, labels in kept], cut


class Conversation(list):
    """A conversation's token ids, and the [first, last] spans of the answers the render check left
    unscored (chat.ChatTemplate.answers: context only), for --show-batch to mark."""

    def __init__(self, ids, context_only=()):
        super().__init__(ids)
        self.context_only = [(first, min(last, len(ids) - 1)) for first, last in context_only if first < len(ids)]


def split(examples, fraction, seed):
    """A deterministic (train, validation) split: the same seed gives the same split."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(len(examples) * fraction))
    if n_val >= len(examples):
        raise NanotuneError(f"{len(examples)} examples are too few to hold out {fraction:.0%} for validation:"
                            " add data or give --val-data")
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


def mix(sources, weights, seed):
    """Mix several datasets: each source contributes its weight's share of the total, sampled
    with repetition when it is too small (general data + target-domain data, say 1:3)."""
    if weights is None:
        return [e for source in sources for e in source]
    if len(weights) != len(sources) or any(w <= 0 for w in weights):
        raise NanotuneError(f"--data-weights needs one positive number per --data file ({len(sources)}), got {weights}")
    total, generator = sum(len(s) for s in sources), torch.Generator().manual_seed(seed)
    mixed = []
    for source, weight in zip(sources, weights):
        n = round(total * weight / sum(weights))
        rounds = math.ceil(n / len(source))                # a source smaller than its share repeats
        picks = torch.cat([torch.randperm(len(source), generator=generator) for _ in range(rounds)])[:n]
        mixed += [source[i] for i in picks.tolist()]
    return mixed


def lm_windows(ids, context, stride):
    """(window, labels) pairs that score every token of `ids` once, for a text longer than the
    model's context: windows of `context` positions, `stride` apart. Each window scores only the
    tokens no earlier window scored, so each of those sees up to `context - stride` tokens of
    context before it: the fixed-length-model perplexity method. (Position t predicts token
    t + 1, so a window's first token is never scored: with stride == context, the windows do not
    overlap and the token at each boundary goes unscored.) Labels are -100 where a token is
    context only."""
    windows, scored_to = [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        window = ids[begin:end]
        new = end - scored_to                                # tokens this window scores
        windows.append((window, [IGNORE] * (len(window) - new) + window[len(window) - new:]))
        scored_to = end
        if end == len(ids):
            break
    return windows


def lm_sequences(token_lists, max_length, eos_id, stride=None):
    """Causal-LM examples: each text's ids + EOS (the model must learn where a text stops), cut
    into windows of max_length, `stride` apart (default: max_length, side by side). Returns
    (sequences, their labels: the ids, with -100 where a token is context only, and how many texts
    needed more than one window)."""
    sequences, labels, too_long = [], [], 0
    for ids in token_lists:
        ids = ids + [eos_id]
        too_long += len(ids) > max_length
        for window, window_labels in lm_windows(ids, max_length, stride or max_length):
            sequences.append(window)
            labels.append(window_labels)
    return sequences, labels, too_long


def pack(token_lists, block_size, eos_id):
    """Concatenate all texts, each followed by EOS, and cut the stream into full blocks: no padding.
    The tail shorter than a block is kept as one last, shorter block."""
    stream = [t for ids in token_lists for t in ids + [eos_id]]
    return [stream[i:i + block_size] for i in range(0, len(stream), block_size)]


class PackedBlock(list):
    """Token ids of several examples side by side, where each one starts (`starts`), and the spans of
    their answers left unscored by the render check (`context_only`, as in Conversation)."""

    def __init__(self, ids, starts):
        super().__init__(ids)
        self.starts = starts
        self.context_only = list(getattr(ids, "context_only", ()))


def segments_and_positions(block):
    """For each position of a packed block: which of its examples (1, 2, ...), and the position
    within that example."""
    starts = getattr(block, "starts", [0])
    segments, positions = [], []
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(block)
        segments += [k + 1] * (end - start)
        positions += list(range(end - start))
    return segments, positions


def pack_examples(sequences, labels, block_size):
    """Whole examples (conversations) side by side in blocks of at most `block_size` tokens, in
    their order, a new block when the next does not fit: less padding, and unlike `pack` no example
    is cut, and none will attend to another (lm_batch numbers them for the attention mask, and
    restarts the positions at each). Returns (blocks, their labels)."""
    blocks, block_labels = [], []
    for ids, lab in zip(sequences, labels):
        if blocks and len(blocks[-1]) + len(ids) <= block_size:
            blocks[-1].starts.append(len(blocks[-1]))
            blocks[-1].context_only += [(a + len(blocks[-1]), b + len(blocks[-1]))
                                        for a, b in getattr(ids, "context_only", ())]
            blocks[-1].extend(ids)
            block_labels[-1].extend(lab)
        else:
            blocks.append(PackedBlock(ids, [0]))
            block_labels.append(list(lab))
    return blocks, block_labels


def batch_order(n, batch_size, seed, epoch, shuffle=True, rank=0, world=1, lengths=None):
    """Lists of example indices, one per batch; the order depends only on (seed, epoch), so a
    resumed run sees exactly the batches the interrupted one would have seen.
    With several ranks, rank r takes every world-th example of the order, starting at r: each
    rank's batch i together are the examples of the one big batch i of a single process. Every rank
    takes n // world examples, so all run the same number of steps (a few are left out per epoch,
    different ones each time).
    With `lengths` (--group-by-length), each batch holds examples of similar length, so less of it
    is padding: the shuffled order is cut into groups of 50 batches, each group sorted by length
    and cut into batches, and the batches are shuffled. Still random, only less mixed in length."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(n, generator=generator).tolist() if shuffle else list(range(n))
    if lengths is not None:
        order = grouped_by_length(order, lengths, batch_size * world, generator)
    mine = order[rank::world][:n // world]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def padding_share(lengths, batches):
    """The share of the positions in these batches that is padding (each batch padded to its longest)."""
    positions = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / positions if positions else 0.0


def grouped_by_length(order, lengths, batch, generator, batches_per_group=50):
    """`order` rearranged so that each run of `batch` indices has similar lengths (longest first in
    a group), the whole runs in a random order and a last, short run kept last."""
    group = batch * batches_per_group
    order = [i for start in range(0, len(order), group)
             for i in sorted(order[start:start + group], key=lambda i: -lengths[i])]
    runs = [order[i:i + batch] for i in range(0, len(order), batch)]
    last = [runs.pop()] if runs and len(runs[-1]) < batch else []
    shuffled = [i for r in torch.randperm(len(runs), generator=generator).tolist() for i in runs[r]]
    return shuffled + [i for run in last for i in run]


def truncate(ids, max_length, keep="head"):
    """A classification example cut to max_length tokens, always keeping its first ([CLS]) and
    last ([SEP]) tokens. `keep`: "head", the start of the text; "tail", its end; "head+tail", a
    quarter from the start and the rest from the end (128 + 382 of 510 tokens was best for long
    reviews in "How to Fine-Tune BERT for Text Classification", Sun et al., 2019: a review's
    opening and its verdict matter most)."""
    if len(ids) <= max_length:
        return ids
    body, room = ids[1:-1], max_length - 2
    if keep == "head":
        kept = body[:room]
    elif keep == "tail":
        kept = body[len(body) - room:]
    else:
        head = round(room * 128 / 510)
        kept = body[:head] + body[len(body) - (room - head):]
    return ids[:1] + kept + ids[-1:]


def lm_batch(sequences, pad_id, labels=None):
    """input_ids, attention_mask and labels (B, T) for causal LM, padded on the right to the longest.
    `labels` (per sequence; default: the ids themselves) are -100 where a token is not to be
    scored; padding gets -100 too. Padding is told apart by position (its labels and mask), never
    by token id: GPT-2 pads with its end-of-text token, and a text's real end-of-text must stay a label."""
    input_ids, attention_mask = pad(sequences, pad_id)
    labels = pad(labels if labels is not None else sequences, IGNORE)[0]
    if any(isinstance(s, PackedBlock) for s in sequences):
        # Examples packed side by side: the mask numbers them, so that none attends to another,
        # and each one's positions count from 0, as if it were alone.
        segments, positions = zip(*(segments_and_positions(s) for s in sequences))
        return {"input_ids": input_ids, "attention_mask": pad(segments, 0)[0], "labels": labels,
                "position_ids": pad(positions, 0)[0]}
    if bool(attention_mask.all()):      # no padding (packed blocks): the fast causal path, no mask
        attention_mask = None
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def classify_batch(sequences, labels, pad_id):
    """input_ids, attention_mask (B, T) padded to the longest, and labels (B,)."""
    input_ids, attention_mask = pad(sequences, pad_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": torch.tensor(labels)}


def pair_batch(pairs, pad_id):
    """Preference pairs (preference.Pair) as one batch of 2B rows, the B chosen answers above the B
    rejected ones, so that one forward pass scores both; each row is scored on its answer only (the
    prompt's labels are -100). With each pair's margin and, when computed before training, the
    reference's log-probabilities of its answers (2B,), in the rows' order."""
    rows = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    labels = [[IGNORE] * len(p.prompt) + p.chosen for p in pairs] + [[IGNORE] * len(p.prompt) + p.rejected
                                                                      for p in pairs]
    batch = lm_batch(rows, pad_id, labels)
    batch["margin"] = torch.tensor([p.margin for p in pairs])
    if all(p.ref is not None for p in pairs):
        batch["ref_logps"] = torch.tensor([p.ref[0] for p in pairs] + [p.ref[1] for p in pairs])
    return batch


def make_batch(task, sequences, labels, indices, pad_id, device, context=None):
    """A batch of the examples at `indices`, on `device`: for a language model `labels` holds each
    sequence's per-token labels (None: the ids themselves), for a classifier each example's label id.
    Padded to its longest example (the chapter pads every batch to 512, which spends most of the
    compute on padding); for training (`context`: the model's), by the few_shapes trick on to a
    multiple of 8 positions, up to the context."""
    if task == "lm":
        batch = lm_batch([sequences[i] for i in indices], pad_id, [labels[i] for i in indices] if labels else None)
    elif task == "dpo":
        batch = pair_batch([sequences[i] for i in indices], pad_id)
    else:
        batch = classify_batch([sequences[i] for i in indices], [labels[i] for i in indices], pad_id)
    if context is not None and tricks.enabled("few_shapes"):      # widths in steps of 8: a few shapes, reused
        batch = tricks.padded_to_multiple(batch, pad_id, context)
    return {k: v.to(device, non_blocking=True) if v is not None else None for k, v in batch.items()}


def padding_note(lengths, batch_size, seed, grouped, packed):
    """How much of the first epoch's batches is padding, with and without --group-by-length: on
    texts of mixed lengths grouping can save most of the compute."""
    if packed:
        return "padding: none (--pack)"
    share = {g: padding_share(lengths, batch_order(len(lengths), batch_size, seed, 0, lengths=lengths if g else None))
             for g in (False, True)}
    other = f"{share[False]:.0%} without it" if grouped else f"{share[True]:.0%} with --group-by-length"
    return f"padding: {share[grouped]:.0%} of the batches' positions ({other})"


def check_something_to_learn(task, train_ids, val_ids, world):
    """A run that would score nothing stops here, rather than saving an untrained model."""
    if len(train_ids) < world:
        raise NanotuneError(f"{len(train_ids)} training sequences cannot be shared by {world} ranks: add data"
                            " or use fewer ranks")
    for name, ids in (("training", train_ids), ("validation", val_ids)):
        if task == "lm" and ids and not any(len(s) > 1 for s in ids):    # position t is scored on token t+1
            raise NanotuneError(f"no {name} token would be scored: every sequence is a single token, with no next token"
                                " to predict: use longer texts or a larger --max-length")
