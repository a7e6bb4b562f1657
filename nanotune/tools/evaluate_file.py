"""generate.py --eval FILE: how good a saved model is on a file, in the training data's formats.
A language model gets loss and perplexity (long texts read in overlapping windows); a classifier
gets accuracy, per-label scores, the confusion matrix and the examples it got most confidently wrong."""
import json

import torch

from ..chat import ChatTemplate, read_template
from ..data import batch_order, make_batch, read_examples, truncate
from ..errors import NanotuneError
from ..losses import IGNORE
from ..models import load_model
from ..preference import answer_logps, render_pairs, scores, tokenize_pairs
from ..evaluate import (classification_report, classify_all, evaluate, format_classification, lm_perplexity,
                        plot_confusion, top_losses)


def evaluate_file(args, model, tokenizer, base=None):
    """(results as a dict, the same as text)."""
    if hasattr(model, "lm_head"):
        examples = read_examples(args.eval, args.text_column, args.label_column, with_labels=False)
        if "messages" in examples[0]:
            return conversations(args, model, tokenizer, examples)
        if "chosen" in examples[0]:                      # preference pairs
            return preference_pairs(args, model, tokenizer, examples, base or args.model)
        r = lm_perplexity(model, [tokenizer.encode(e["text"]) + [tokenizer.eos_id] for e in examples], args.stride)
        context = model.config.context
        windows = (f" ({r['long_texts']} longer than the context of {context}, read in windows {r['stride']}"
                   " tokens apart)"
                   if r["long_texts"] else "")
        return r, (f"{r['texts']} texts, {r['tokens_scored']:,} tokens scored{windows}\n"
                   f"loss {r['loss']:.4f}, perplexity {r['perplexity']:.2f}")
    examples = read_examples(args.eval, args.text_column, args.label_column, with_labels=True)
    names = model.config.labels
    unknown = sorted({e["label"] for e in examples} - set(names))
    if unknown:
        raise NanotuneError(f"--eval {args.eval} has labels the model does not know ({', '.join(unknown)});"
                            f" it knows {', '.join(names)}")
    texts, labels = [e["text"] for e in examples], [names.index(e["label"]) for e in examples]
    sequences = [truncate(s, model.config.max_position_embeddings) for s in tokenizer.encode_batch(texts)]
    probs = classify_all(model, sequences, tokenizer.pad_id)
    r = classification_report(probs.argmax(-1).tolist(), labels, names)
    r["top_losses"] = top_losses(probs, labels, texts, names, args.top_losses)
    if args.plot:
        plot_confusion(r, args.plot)
    return r, format_classification(r, r["top_losses"])


def conversations(args, model, tokenizer, examples):
    """Loss and perplexity on the answers only: the tokens of the assistant's turns (and their
    end-of-turn tokens), as they were trained; the questions are given, not predicted."""
    source = read_template(None, args.chat_template) if args.chat_template else tokenizer.chat_template
    if source is None:
        raise NanotuneError(f"--eval {args.eval} holds conversations, and the model has no chat template to write them"
                            " with: give one with --chat-template FILE, or --chat-template chatml")
    template, context = ChatTemplate(source, tokenizer), model.config.context
    pairs = [template.tokenize(e["messages"]) for e in examples]
    ids, labels = [i[:context] for i, _ in pairs], [lab[:context] for _, lab in pairs]
    device = next(model.parameters()).device
    r = evaluate(model, "lm", ids, labels, 8, tokenizer.pad_id, device)
    r |= {"conversations": len(examples), "answer_tokens": sum(t != IGNORE for lab in labels for t in lab[1:])}
    return r, (f"{r['conversations']} conversations, {r['answer_tokens']:,} answer tokens scored (the questions are"
               f" not)\nloss {r['loss']:.4f}, perplexity {r['perplexity']:.2f}")


@torch.no_grad()
def preference_pairs(args, model, tokenizer, examples, base):
    """Pairwise accuracy on preference pairs: the share whose chosen answer the model gives a higher
    log-probability than the rejected one (a reward model: a higher score). For an adapter, also
    DPO's reward accuracy: the share whose chosen answer gained more log-probability than the
    rejected one since the base model, which is what DPO trains (a pair both models rank right can
    still have lost ground)."""
    render_pairs(examples, [], tokenizer, args.model, args.chat_template)
    pairs = tokenize_pairs(examples, tokenizer, model.config.context)[0]
    device = next(model.parameters()).device
    if hasattr(model, "score"):                          # a reward model: its scores rank the answers
        wins = 0
        for indices in batch_order(len(pairs), 8, 0, 0, shuffle=False):
            chosen, rejected = scores(model, make_batch("dpo", pairs, None, indices, tokenizer.pad_id, device)).chunk(2)
            wins += int((chosen > rejected).sum())
        r = {"pairs": len(pairs), "accuracy": wins / len(pairs)}
        return r, f"{len(pairs)} pairs: the reward model scores the chosen answer higher in {r['accuracy']:.1%}"
    reference = load_model(base, device=device).eval() if args.adapter or base != args.model else None
    wins, gains = 0, 0
    for indices in batch_order(len(pairs), 8, 0, 0, shuffle=False):
        batch = make_batch("dpo", pairs, None, indices, tokenizer.pad_id, device)
        chosen, rejected = answer_logps(model, batch)[0].chunk(2)                  # the chosen rows come first
        wins += int((chosen > rejected).sum())
        if reference is not None:
            ref_chosen, ref_rejected = answer_logps(reference, batch)[0].chunk(2)
            gains += int(((chosen - ref_chosen) > (rejected - ref_rejected)).sum())
    r = {"pairs": len(pairs), "accuracy": wins / len(pairs)}
    text = f"{len(pairs)} pairs: the chosen answer more likely than the rejected one in {r['accuracy']:.1%}"
    if reference is not None:
        r["reward_accuracy"] = gains / len(pairs)
        text += f"\nagainst the base model {base}: reward accuracy {r['reward_accuracy']:.1%}"
    return r, text


def show(args, result, text):
    print(json.dumps(result, indent=2) if args.json else text)
    return 0
