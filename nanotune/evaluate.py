"""Is the model any good? Loss and perplexity for a language model, accuracy and the rest for a
classifier: on the validation data after every epoch of training (`evaluate`), and on a file by
`generate.py --model DIR --eval FILE`."""
import contextlib
import math

import torch

from .data import batch_order, lm_windows, make_batch
from .losses import IGNORE, causal_lm_loss_sum, classification_loss
from .tokenizer import pad


@torch.no_grad()
def evaluate(model, task, sequences, labels, batch_size, pad_id, device, num_labels=0, autocast=contextlib.nullcontext):
    """The validation loss (and perplexity, or accuracy and macro-F1), with dropout off: the model
    as it will be used. The batches are the training run's own (padded per batch), in order."""
    model.eval()
    total, count, predictions = 0.0, 0, []
    for indices in batch_order(len(sequences), batch_size, 0, 0, shuffle=False):
        batch = make_batch(task, sequences, labels, indices, pad_id, device)
        with autocast():
            if task == "lm":
                logits = model(batch["input_ids"], batch["attention_mask"], batch.get("position_ids"))
            else:
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
        report = classification_report(torch.cat(predictions).tolist(), labels, list(range(num_labels)))
        result["accuracy"], result["macro_f1"] = report["accuracy"], report["macro_f1"]
    return result


@torch.no_grad()
def lm_perplexity(model, token_lists, stride=None, batch_size=8):
    """Mean loss and perplexity over every token of the texts (each a list of ids, EOS included).
    `stride`: how far apart the windows over a long text start; at most (and by default) the
    context less one, so that a window's first scored token has a token before it to predict from."""
    model.eval()
    context = model.config.context
    stride = min(stride or context - 1, context - 1)
    windows = [w for ids in token_lists for w in lm_windows(ids, context, stride)]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        part = windows[start:start + batch_size]
        ids, mask = pad([w for w, _ in part], 0)
        labels, _ = pad([lab for _, lab in part], IGNORE)                 # padding is never scored
        logits = model(ids.to(device), mask.to(device))
        s, n = causal_lm_loss_sum(logits, labels.to(device))
        total, count = total + float(s), count + int(n)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "tokens_scored": count, "texts": len(token_lists),
            "windows": len(windows), "long_texts": sum(len(ids) > context for ids in token_lists), "stride": stride}


@torch.no_grad()
def classify_all(model, sequences, pad_id, batch_size=32):
    """Probabilities (N, labels) of every sequence (lists of ids)."""
    model.eval()
    device = next(model.parameters()).device
    probs = []
    for start in range(0, len(sequences), batch_size):
        ids, mask = pad(sequences[start:start + batch_size], pad_id)
        probs.append(model(ids.to(device), mask.to(device)).float().softmax(-1).cpu())
    return torch.cat(probs)


def classification_report(predictions, labels, names):
    """Accuracy, macro-F1, per-label precision / recall / F1 / support, and the confusion matrix
    (rows: the true label, columns: the predicted one). Precision: of the examples predicted as a
    label, the share that have it; recall: of the examples that have it, the share found; F1: their
    harmonic mean (0 when the label is neither predicted nor present, as in scikit-learn)."""
    k = len(names)
    confusion = torch.zeros(k, k, dtype=torch.long)
    ones = torch.ones(len(labels), dtype=torch.long)
    confusion.index_put_((torch.as_tensor(labels), torch.as_tensor(predictions)), ones, accumulate=True)
    per_label = {}
    for i, name in enumerate(names):
        tp, predicted, support = int(confusion[i, i]), int(confusion[:, i].sum()), int(confusion[i].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
        per_label[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return {"accuracy": float(confusion.diag().sum()) / max(len(labels), 1),
            "macro_f1": sum(v["f1"] for v in per_label.values()) / k,
            "per_label": per_label, "confusion": confusion.tolist(), "labels": list(names), "examples": len(labels)}


def top_losses(probs, labels, texts, names, k):
    """The k examples the model got most confidently wrong: misclassified, by their loss
    -log p(true label), largest first."""
    labels = torch.as_tensor(labels)
    loss = -probs[torch.arange(len(labels)), labels].clamp_min(1e-12).log()
    wrong = (probs.argmax(-1) != labels).nonzero().flatten().tolist()
    wrong.sort(key=lambda i: -float(loss[i]))
    return [{"text": texts[i], "true": names[labels[i]], "predicted": names[int(probs[i].argmax())],
             "p_predicted": float(probs[i].max()), "p_true": float(probs[i, labels[i]]), "loss": float(loss[i])}
            for i in wrong[:k]]


def format_classification(report, losses):
    """The report as text: the summary, a per-label table, the confusion matrix, the top losses."""
    names = report["labels"]
    width = max(9, *map(len, names)) + 2
    lines = [f"accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f} over {report['examples']}"
             " examples", "",
             f"{'label':<{width}}precision  recall      F1  support"]
    for name, v in report["per_label"].items():
        lines.append(f"{name:<{width}}{v['precision']:>9.3f}{v['recall']:>8.3f}{v['f1']:>8.3f}{v['support']:>9}")
    lines += ["", "confusion matrix (rows: true label, columns: predicted)",
              " " * width + "".join(f"{n:>{width}}" for n in names)]
    for name, row in zip(names, report["confusion"]):
        lines.append(f"{name:<{width}}" + "".join(f"{c:>{width}}" for c in row))
    if losses:
        lines += ["", f"the {len(losses)} most confidently wrong:"]
        for e in losses:
            lines.append(f"  {e['true']} predicted as {e['predicted']} (p={e['p_predicted']:.3f};"
                         f" p({e['true']})={e['p_true']:.3f}, loss {e['loss']:.2f}): {e['text'][:100]}")
    return "\n".join(lines)


def plot_confusion(report, path):
    """The confusion matrix as a PNG (needs matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names, confusion = report["labels"], report["confusion"]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.2 * len(names) + 1.5))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = max(max(row) for row in confusion) or 1
    for i, row in enumerate(confusion):
        for j, c in enumerate(row):
            ax.text(j, i, c, ha="center", va="center", color="white" if c > top / 2 else "black")
    ax.set_title(f"accuracy {report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
