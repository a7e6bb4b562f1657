"""The two losses nanotune trains with, written out.

Labels use the Hugging Face convention: -100 marks a position that is not scored (padding).
"""
import torch.nn.functional as F

IGNORE = -100


def causal_lm_loss_sum(logits, labels):
    """Summed next-token cross-entropy, and the number of tokens it sums over.

    Position t predicts token t+1, so the labels move one place left and the last position, which
    has no next token, gets -100. (Shifting the labels, not the logits, avoids copying the large
    (B, T, V) logits tensor.) Padding (label -100) is not scored. The caller divides by the number of real tokens in
    the whole optimizer step: with gradient accumulation, averaging each micro-batch (MEAN) and
    then averaging those would weight a token in a short micro-batch more than one in a long one;
    summing (SUM) and dividing once weights every token the same.
    """
    labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE)     # (B, T): the token that came next
    # cross-entropy = logsumexp over the vocabulary minus the logit of the true token, in fp32
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, (labels != IGNORE).sum()


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
