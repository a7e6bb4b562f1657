"""What the tokenizer makes of your data, before training on it: words it splits into many
pieces (candidates for --add-tokens), characters it cannot encode as a token of their own, how
long the examples are in tokens and what --max-length cuts, and for classification how skewed
the labels are."""
import statistics
from collections import Counter

SPLIT = 3              # a word in this many pieces or more is reported


def data_report(examples, tokenizer, task, max_length, truncation="head", top=10) -> dict:
    texts = [e["text"] for e in examples]
    encodings = tokenizer.tokenizer.encode_batch(texts)
    specials = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
    unk = tokenizer.tokenizer.token_to_id("[UNK]")

    # Words (as the tokenizer's pre-tokenizer splits the text) and how many pieces each became.
    words, split_words = Counter(), Counter()
    for text, enc in zip(texts, encodings):
        pieces = Counter(w for w in enc.word_ids if w is not None)
        for word_id, n in pieces.items():
            start, end = enc.word_to_chars(word_id)
            word = text[start:end].strip()
            words[word] += 1
            if n >= SPLIT:
                split_words[word] += 1

    # Characters that are not one token of their own: [UNK] (WordPiece) or several byte pieces (byte-level BPE).
    chars = Counter(c for text in texts for c in text if not c.isspace())
    unencodable = {}
    for c, count in chars.items():
        ids = tokenizer.encode(c, add_special_tokens=False)
        if unk is not None and unk in ids:
            unencodable[c] = {"count": count, "as": "[UNK]"}
        elif len(ids) > 1 and not c.isascii():
            unencodable[c] = {"count": count, "as": f"{len(ids)} byte pieces"}

    # Lengths in tokens, as training sees them (LM texts end with EOS; classification has [CLS] ... [SEP];
    # a conversation's template writes its own ends). What --max-length does to the longer ones: a
    # text is cut into windows, every token still trained on; a conversation is cut, and what is cut
    # off, its answer's end or the whole answer, is not learned (train.tokenize leaves out the
    # conversations with no answer token left, and names them).
    chats = bool(examples) and "messages" in examples[0]
    lengths = [len(enc.ids) + (1 if task == "lm" and not chats else 0) for enc in encodings]
    handling = ("cut at --max-length: the tokens beyond it are not trained on" if chats else
                "cut into windows (all tokens kept)" if task == "lm" else f"truncated ({truncation})")
    cut = [n for n in lengths if n > max_length]
    ordered = sorted(lengths)
    report = {
        "examples": len(texts),
        "words": sum(words.values()),
        "split_words": {"count": sum(split_words.values()), "distinct": len(split_words),
                        "most_frequent": split_words.most_common(top)},
        "unencodable_characters": dict(sorted(unencodable.items(), key=lambda kv: -kv[1]["count"])[:top]),
        "lengths": {"median": statistics.median(lengths),
                    "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
                    "max": max(lengths), "max_length": max_length, "longer": len(cut),
                    "tokens_beyond": sum(n - max_length for n in cut),
                    "handling": handling},
        "specials": sorted(i for i in specials if i is not None),
    }
    if chats:
        affected = [len(e.get("affected", ())) for e in examples]
        report["conversations"] = {"converted": dict(Counter(e["converted"] for e in examples if "converted" in e)),
                                   "answers_not_as_served": sum(affected),
                                   "conversations_affected": sum(n > 0 for n in affected)}
    if task == "classify":
        counts = Counter(e["label"] for e in examples)
        ratio = max(counts.values()) / min(counts.values())
        report["labels"] = {"counts": dict(counts.most_common()), "imbalance": ratio}
    return report


def format_report(r) -> str:
    lines = [f"data report: {r['examples']:,} examples, {r['words']:,} words"]
    s = r["split_words"]
    share = s["count"] / max(r["words"], 1)
    frequent = ", ".join(f"{w!r} x{n}" for w, n in s["most_frequent"])
    advice = f"; the most frequent: {frequent} (frequent ones are candidates for --add-tokens)" if frequent else ""
    lines.append(f"- {s['count']:,} words ({share:.1%}; {s['distinct']:,} distinct) are split into {SPLIT} or more"
                 f" tokens{advice}")
    u = r["unencodable_characters"]
    lines.append("- characters the tokenizer cannot encode as a token of their own: "
                 + (", ".join(f"{c!r} x{v['count']} ({v['as']})" for c, v in u.items()) if u else "none"))
    n = r["lengths"]
    lines.append(f"- length in tokens: median {n['median']:g}, 95th percentile {n['p95']}, longest {n['max']};"
                 f" {n['longer']} examples are longer than --max-length {n['max_length']}"
                 + (f" ({n['tokens_beyond']:,} tokens beyond it: {n['handling']})" if n["longer"] else ""))
    if "conversations" in r:
        lines += conversation_lines(r["conversations"])
    if "labels" in r:
        counts, ratio = r["labels"]["counts"], r["labels"]["imbalance"]
        skewed = ": skewed; consider --class-weights balanced, so each label weighs the same in the loss"
        lines.append("- labels: " + ", ".join(f"{k} {v}" for k, v in counts.items())
                     + f"; the largest is {ratio:.1f}x the smallest" + (skewed if ratio > 3 else ""))
    return "\n".join(lines)


CONVERSIONS = {"ShareGPT": "ShareGPT's 'conversations' of {from, value} read as messages (human -> user, gpt ->"
                           " assistant, system -> system, tool -> tool)",
               "Alpaca": "Alpaca's instruction (and input, below it) read as the user's turn, output as the answer"}


def conversation_lines(c):
    """How conversations were read, and the render check: answers that training would render
    otherwise than serving does (chat.ChatTemplate.answers)."""
    lines = [f"- {CONVERSIONS[kind]}: {n:,} conversations" for kind, n in c["converted"].items()]
    if c["answers_not_as_served"]:
        turns, conversations = c["answers_not_as_served"], c["conversations_affected"]
        lines.append(f"- render check: {turns:,} assistant turns in {conversations:,} conversations are rendered"
                     " differently in training than at serving time (the chat template changes earlier turns, as"
                     " Qwen3's drops their <think> blocks): they are kept as context and not scored, so those"
                     " conversations train on their exact answers (the last one); --train-on strict refuses"
                     " instead, --show-batch marks them")
    else:
        lines.append("- render check: every answer is scored in the context a server will give it")
    return lines
