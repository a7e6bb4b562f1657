"""The two losses nanotune trains with, written out.

Labels use the Hugging Face convention: -100 marks a position that is not scored (padding).
"""
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
    # cross-entropy = logsumexp over the vocabulary minus the logit of the true token, in fp32
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, (labels != IGNORE).sum()


def scored_count(batch) -> int:
    """What a batch's summed loss sums over: the tokens that have a next token to predict (LM,
    labels (B, T)), or the examples (classification, labels (B,))."""
    labels = batch["labels"]
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


class _OutputLayerCrossEntropy(torch.autograd.Function):
    """sum over rows of cross-entropy(hidden @ weight.T, labels), computed a chunk of rows at a
    time, with the gradients worked out on the way (d loss / d logits = softmax - one-hot), so the
    full (rows, vocab) logits and their gradient never exist at once. The matrix products run in
    `dtype` (bf16 under autocast), softmax and the sum in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, dtype):
        # Cast once here, not once per chunk and product as autocast would (the weight is 50,257 x C).
        hidden_lp, weight_lp = hidden.to(dtype), weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden_lp)
        grad_weight = None
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden_lp[start:start + chunk], labels[start:start + chunk]
            logits = (h @ weight_lp.t()).float()                         # (n, V)
            scored = (y != IGNORE)
            y = y.clamp(min=0)
            target = logits.gather(1, y[:, None])                        # (n, 1): logit of the true token
            top = logits.amax(dim=-1, keepdim=True)                      # (n, 1): so that exp cannot overflow
            grad = logits.sub_(top).exp_()                               # in place of the logits
            norm = grad.sum(dim=-1, keepdim=True)                        # (n, 1)
            # cross-entropy = logsumexp(logits) - logit of the true token
            total += ((top + norm.log() - target).squeeze(1) * scored).sum()
            grad.div_(norm)                                              # softmax
            grad[torch.arange(len(y), device=y.device), y] -= 1.0        # minus the one-hot target
            grad = grad.mul_(scored[:, None]).to(dtype)                  # ignored rows add nothing
            grad_hidden[start:start + chunk] = grad @ weight_lp
            if not weight.requires_grad:
                continue
            if grad_weight is None:
                grad_weight = (grad.t() @ h).to(weight.dtype)            # (V, C)
            elif dtype == weight.dtype:
                grad_weight.addmm_(grad.t(), h)                          # in place: no (V, C) temporary
            else:   # a slice at a time: no (V, C) fp32 temporary for the cast
                for acc, part in zip(grad_weight.split(4096), (grad.t() @ h).split(4096)):
                    acc += part
        ctx.save_for_backward(grad_hidden.to(hidden.dtype), grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        # Scaled in place: no second (V, C) tensor. (Autograd counts versions, so a second backward
        # through this graph would raise instead of reusing the scaled values.)
        if grad_weight is not None:
            grad_weight.mul_(grad_total)
        return grad_hidden.mul_(grad_total), grad_weight, None, None, None


def output_layer_lm_loss_sum(hidden, weight, labels, chunk=512):
    """`causal_lm_loss_sum(hidden @ weight.T, labels)` without ever holding all the logits.

    GPT-2's output layer maps each position to 50,257 scores: for 8 x 128 tokens the logits, their
    fp32 copy, the log-softmax and its gradient are ~200 MB each. Here they exist for `chunk`
    positions at a time. Same numbers, same gradients (see tests/test_train.py)."""
    labels = next_token_labels(labels)                                   # (B, T): the token that came next
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    total = _OutputLayerCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), chunk, dtype)
    return total, (labels != IGNORE).sum()
