"""Why did the model say that? Integrated gradients for a classifier's prediction (with the [CLS]
attention beside it, for comparison), and each step of text generation, filter by filter."""
import json
import math

import torch

from ..errors import NanotuneError
from ..generation import generate, repetition_penalty_, top_k_filter, top_p_filter
from ..run.cli import use_colour

ATTENTION_CAVEAT = ("attention shows where the last layer's [CLS] position looked, not what decided the"
                    " label: the values it mixed, the layers before it and the head after it all count, and"
                    " quite different attention can give the same prediction (Jain & Wallace, 2019)")


# ---- a classifier: integrated gradients --------------------------------------------------------

def label_evidence(logits, label):
    """The label's logit minus the mean logit. Softmax ignores what all logits share, so this is
    the part of the logit that decides the prediction (for two labels: half the log-odds)."""
    return logits[..., label] - logits.mean(-1)


def integrated_gradients(model, ids, mask, label, steps=32, baseline="pad", pad_id=0, keep_ids=()):
    """Attributions (T,) of `label_evidence` to each token of one text (ids and mask (1, T)), and
    the evidence at the input and at the baseline.

    Integrated gradients (Sundararajan et al., 2017) walks a straight line in embedding space from
    a baseline that says nothing (every token replaced by padding, or zero embeddings) to the
    text, and adds up the gradient along the way: token i gets (x_i - x'_i) . mean over the path of
    d evidence / d x_i. The attributions add up to the evidence at the input minus that at the
    baseline (completeness), up to the error of summing `steps` points instead of integrating.
    Tokens in `keep_ids` ([CLS], [SEP]) are the same in the baseline, so they get nothing."""
    embed = model.bert.embeddings.word_embeddings
    keep = torch.isin(ids, torch.tensor(list(keep_ids), dtype=ids.dtype, device=ids.device))
    with torch.no_grad():
        x = embed(ids)                                                        # (1, T, H)
        if baseline == "pad":
            x0 = embed(ids.masked_fill(~keep, pad_id))
        else:
            x0 = torch.where(keep[..., None], x, torch.zeros_like(x))
    alphas = (torch.arange(steps, device=x.device, dtype=x.dtype) + 0.5) / steps    # the middle of each piece
    path = (x0 + alphas[:, None, None] * (x - x0)).requires_grad_(True)              # (steps, T, H)
    with torch.enable_grad():
        logits = model(ids.expand(steps, -1), mask.expand(steps, -1), inputs_embeds=path).float()
        (grads,) = torch.autograd.grad(label_evidence(logits, label).sum(), path)
    attributions = ((x - x0)[0] * grads.mean(0)).sum(-1)                             # (T,)
    with torch.no_grad():
        logits = model(ids.expand(2, -1), mask.expand(2, -1), inputs_embeds=torch.cat([x, x0])).float()
        ends = label_evidence(logits, label)
    return attributions, float(ends[0]), float(ends[1])


@torch.no_grad()
def cls_attention(model, ids, mask):
    """(heads, T): how much the [CLS] position of the last layer attends to each token, per head."""
    layer = model.bert.encoder["layer"][-1].attention["self"]
    seen = {}
    handle = layer.register_forward_hook(lambda module, args, out: seen.update(x=args[0]))   # None: the output stays
    try:
        model(ids, mask)
    finally:
        handle.remove()
    x = seen["x"][:, :1]                                                             # (1, 1, H): the [CLS] query
    B, T, H = seen["x"].shape
    heads = layer.n_head
    q = layer.query(x).view(1, 1, heads, H // heads).transpose(1, 2)                # (1, nh, 1, hs)
    k = layer.key(seen["x"]).view(1, T, heads, H // heads).transpose(1, 2)          # (1, nh, T, hs)
    scores = (q @ k.transpose(-2, -1))[0, :, 0] / math.sqrt(H // heads)              # (nh, T)
    return scores.masked_fill(~mask[0].bool(), float("-inf")).softmax(-1)


def explain_prediction(model, tokenizer, text, steps=32, baseline="pad", attention=False):
    """Everything `generate.py --explain` prints for one text and a classifier."""
    ids, mask = tokenizer([text], max_length=model.config.max_position_embeddings)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        probs = model(ids, mask).float().softmax(-1)[0]
    label = int(probs.argmax())
    specials = {i for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) if i is not None}
    attributions, at_input, at_baseline = integrated_gradients(model, ids, mask, label, steps, baseline,
                                                               tokenizer.pad_id, specials)
    change = at_input - at_baseline
    result = {"text": text, "label": model.config.labels[label], "probability": float(probs[label]),
              "tokens": [tokenizer.tokenizer.id_to_token(int(i)) for i in ids[0]],
              "attributions": attributions.tolist(), "evidence": at_input, "evidence_at_baseline": at_baseline,
              "gap_percent": 100 * abs(float(attributions.sum()) - change) / max(abs(change), 1e-12)}
    if attention:
        result["cls_attention"] = cls_attention(model, ids, mask).tolist()
    return result


def format_prediction(r, colour=False, top=3):
    tokens, attributions = r["tokens"], r["attributions"]
    scale = max(map(abs, attributions)) or 1.0
    words = []
    for token, a in zip(tokens, attributions):
        if colour:   # green for the label, red against it, brighter for more
            shade = int(255 - 155 * min(abs(a) / scale, 1))
            rgb = f"{shade};255;{shade}" if a > 0 else f"255;{shade};{shade}"
            words.append(f"\x1b[48;2;{rgb}m\x1b[30m{token}\x1b[0m")
        else:
            words.append(f"{token}({a:+.2f})")
    ranked = sorted((a, t) for t, a in zip(tokens, attributions) if a != 0)
    lines = [f"{r['label']} (p={r['probability']:.3f})  {r['text']}", "  " + " ".join(words),
             f"  for {r['label']}: " + ", ".join(f"{t} {a:+.2f}" for a, t in reversed(ranked[-top:]) if a > 0),
             "  against: " + ", ".join(f"{t} {a:+.2f}" for a, t in ranked[:top] if a < 0),
             f"  completeness: the attributions add up to {sum(attributions):+.3f}; the label's evidence (its"
             f" logit minus the mean logit) is {r['evidence']:+.3f} here and {r['evidence_at_baseline']:+.3f}"
             f" at the baseline, a difference of {r['evidence'] - r['evidence_at_baseline']:+.3f}: a gap of"
             f" {r['gap_percent']:.1f}%"]
    if "cls_attention" in r:
        lines.append("  [CLS] attention in the last layer, per head (the three tokens it looks at most):")
        for h, row in enumerate(r["cls_attention"]):
            best = sorted(range(len(row)), key=lambda i: -row[i])[:3]
            lines.append(f"    head {h}: " + ", ".join(f"{tokens[i]} {row[i]:.2f}" for i in best))
        lines.append(f"  ({ATTENTION_CAVEAT})")
    return "\n".join(lines)


# ---- a language model: each sampling step ----------------------------------------------------

def sampling_stages(logits, seen, temperature, top_k, top_p, repetition_penalty):
    """[(stage name, logits)] for one row: the model's logits, then each change generation makes to
    them, in generation's order (generation.generate, next_tokens), skipping those that do nothing."""
    stages = [("the model", logits)]
    if repetition_penalty != 1.0:
        penalised = repetition_penalty_(stages[-1][1], seen, repetition_penalty)
        stages.append((f"repetition penalty {repetition_penalty:g}", penalised))
    if temperature == 0:
        return stages
    if temperature != 1.0:
        stages.append((f"temperature {temperature:g}", stages[-1][1] / temperature))
    if top_k is not None and top_k < logits.shape[-1]:
        stages.append((f"top-k {top_k}", top_k_filter(stages[-1][1], top_k)))
    if top_p is not None and top_p < 1.0:
        stages.append((f"top-p {top_p:g}", top_p_filter(stages[-1][1], top_p)))
    return stages


def explain_step(logits, seen, chosen, temperature, top_k, top_p, repetition_penalty, decode, top=5):
    """One step of one sequence: each stage's top candidates and their probabilities, its entropy,
    what a filter removed and how much probability that held, and the token drawn."""
    report, before = [], None
    for name, stage in sampling_stages(logits.float(), seen, temperature, top_k, top_p, repetition_penalty):
        probs = stage.softmax(-1)
        entropy = float(-(probs * probs.clamp_min(1e-30).log()).sum())
        values, order = probs.topk(top)
        top_tokens = [(decode(int(i)), float(v)) for v, i in zip(values, order) if v > 0]
        entry = {"stage": name, "top": top_tokens, "entropy": entropy}
        if before is not None:
            removed = (probs == 0) & (before > 0)
            entry |= {"removed": int(removed.sum()), "removed_mass": float(before[removed].sum())}
        report.append(entry)
        before = probs
    return {"stages": report, "chosen": decode(int(chosen)), "probability": float(before[chosen]),
            "greedy": temperature == 0}


def format_steps(prompt, steps):
    lines = [f"prompt: {prompt!r}"]
    for n, step in enumerate(steps, start=1):
        lines.append(f"step {n}:")
        for s in step["stages"]:
            cut = (f"  (removed {s['removed']:,} token{'s' if s['removed'] > 1 else ''} holding {s['removed_mass']:.3f}"
                   " of the probability)") if s.get("removed") else ""
            top = "  ".join(f"{t!r} {p:.3f}" for t, p in s["top"])
            lines.append(f"  {s['stage']:<24} {top}   entropy {s['entropy']:.2f} nats{cut}")
        how = "picked (the most likely)" if step["greedy"] else "drew"
        lines.append(f"  {how} {step['chosen']!r}, probability {step['probability']:.3f}")
    return "\n".join(lines)


# ---- generate.py --explain ---------------------------------------------------------------------

def explain_classifier(args, model, tokenizer, prompts):
    if not prompts:
        raise NanotuneError("--explain needs text: give --prompt or --prompt-file")
    results = [explain_prediction(model, tokenizer, p, args.ig_steps, args.ig_baseline, args.show_attention)
               for p in prompts]
    return results, "\n\n".join(format_prediction(r, colour=use_colour()) for r in results)


def explain_generation(args, model, tokenizer, sequences, prompts, generator):
    """--explain with a language model: every step of every sequence, filter by filter."""
    steps = [[] for _ in sequences]
    decode = lambda i: tokenizer.decode([i], skip_special_tokens=False)
    top_k = args.top_k or None

    def on_step(logits, seen, tokens):
        for i, token in enumerate(tokens.tolist()):
            steps[i].append(explain_step(logits[i], None if seen is None else seen[i], token, args.temperature, top_k,
                                         args.top_p, args.repetition_penalty, decode, args.explain_top))
    new = generate(model, sequences, args.max_new_tokens, tokenizer.pad_id, tokenizer.eos_id, args.temperature,
                   top_k, args.top_p, args.repetition_penalty, generator, on_step=on_step)
    steps = [s[:len(n) + 1] for s, n in zip(steps, new)]       # up to the step that ended the sequence
    texts = [prompts[i // args.num_samples] if prompts else "" for i in range(len(sequences))]
    if args.json:
        found = [{"prompt": t, "text": tokenizer.decode(n), "steps": s} for t, n, s in zip(texts, new, steps)]
        print(json.dumps(found, indent=2))
    else:
        print("\n\n".join(format_steps(t, s) + f"\ntext: {t + tokenizer.decode(n)!r}"
                          for t, n, s in zip(texts, new, steps)))
    return 0
