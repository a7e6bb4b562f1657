"""The two losses nanotune trains with, written out.

Labels use the Hugging Face convention: -100 marks a position that is not scored (padding), and
PyTorch's cross-entropy skips it (`ignore_index`). For GPT-2 the fast twin of the LM loss, which
never holds all the logits, is tricks.chunked_lm_loss_sum.
"""
from collections import Counter

import torch
import torch.nn.functional as F

IGNORE = -100


def next_token_labels(labels):
    """Position t predicts token t+1: the labels move one place left, and the last position, which
    has no next token, gets -100. (Shifting the labels, not the logits, avoids copying the large
    (B, T, V) logits tensor.)"""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def causal_lm_loss_sum(logits, labels):
    """Summed next-token cross-entropy, and the number of tokens it sums over.

    Padding (label -100) is not scored. The caller divides by the number of real tokens in the
    whole optimizer step: with gradient accumulation, averaging each micro-batch (MEAN) and
    then averaging those would weight a token in a short micro-batch more than one in a long one;
    summing (SUM) and dividing once weights every token the same.
    """
    labels = next_token_labels(labels)                       # (B, T): the token that came next
    # cross-entropy = -log softmax(logits)[true token] = logsumexp(logits) - logit of the true token,
    # in fp32 (bf16's 8 bits of mantissa would round a 50,257-way softmax badly)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, (labels != IGNORE).sum()


def scored_count(batch) -> int:
    """What a batch's summed loss sums over: the tokens that have a next token to predict (LM,
    labels (B, T)), the examples (classification, labels (B,)), or the pairs (preference)."""
    labels = batch["labels"]
    if "margin" in batch:                # preference pairs: the loss is a mean over pairs, not tokens
        return batch["margin"].numel()
    if labels.dim() == 1:
        return labels.numel()
    return int((next_token_labels(labels) != IGNORE).sum())


def causal_lm_loss(logits, labels):
    """Mean next-token cross-entropy over real tokens (what `transformers` reports as `loss`)."""
    total, count = causal_lm_loss_sum(logits, labels)
    return total / count.clamp(min=1)


def classification_loss(logits, labels, class_weights=None, label_smoothing=0.0):
    """Cross-entropy over the labels: -log softmax(logits)[true label], averaged over the batch.

    `class_weights` (one per label) scale each example's loss by the weight of its true label, so
    a rare class counts as much as a frequent one; `label_smoothing` moves that share of the target
    probability from the true label to all labels evenly, which discourages over-confidence.
    """
    return F.cross_entropy(logits.float(), labels, weight=class_weights, label_smoothing=label_smoothing)


def balanced_class_weights(label_ids, num_labels, device=None):
    """n / (k * count) for each label: every label weighs the same in total, however rare it is
    (a label absent from the data gets 0)."""
    counts = Counter(label_ids)
    weights = [len(label_ids) / (num_labels * counts[k]) if counts[k] else 0.0 for k in range(num_labels)]
    return torch.tensor(weights, device=device)
