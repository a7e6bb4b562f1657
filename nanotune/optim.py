"""What is trained and how fast: frozen parts, AdamW parameter groups, the learning-rate schedule."""
import math
import re

import torch
import torch.nn as nn

from . import tricks
from .errors import NanotuneError
from .hub import own_memory
from .quantize import _bitsandbytes


def freeze(model, what):
    """Classic transfer learning: keep part of the pre-trained network fixed.
    "embeddings": the embedding tables; an integer N: the embeddings and the first N layers;
    "body": everything but the classification head (GPT-2's head is the embedding, so "body" means
    all of GPT-2's blocks but keeps the final LayerNorm trainable)."""
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    layers = next(m for m in model.modules() if isinstance(m, nn.ModuleList))   # the transformer blocks
    if what == "embeddings":
        frozen = embeddings
    elif what == "body":
        frozen = embeddings + list(layers)
    elif str(what).isdigit() and int(what) <= len(layers):
        frozen = embeddings + list(layers[:int(what)])
    else:
        raise NanotuneError(f"--freeze {what!r}: use embeddings, body, or a number of layers up to {len(layers)}")
    for module in frozen:
        module.requires_grad_(False)


def depth(name, n_layers) -> int:
    """Where a parameter sits, from the bottom: 0 for the embeddings, i + 1 for transformer block i,
    n_layers + 1 for the head (the final LayerNorm, BERT's pooler and classifier). GPT-2's output
    layer is its token embedding, so it sits at 0."""
    block = re.search(r"\.(?:h|layer|layers)\.(\d+)\.", name)
    if block:
        return int(block.group(1)) + 1
    if any(part in name for part in ("wte", "wpe", "embeddings", "embed_tokens")):
        return 0
    return n_layers + 1


def layers_of(model) -> int:
    return getattr(model.config, "n_layer", None) or model.config.num_hidden_layers


def param_groups(model, weight_decay, lr_decay=None):
    """AdamW's parameter groups. Weight decay goes to the matrices of linear layers only: decaying
    biases, the gains of LayerNorm and RMSNorm, or embedding rows towards zero hurts and regularises
    nothing useful.

    With `lr_decay` (discriminative learning rates, ULMFiT): one pair of groups per depth, the head
    at the full rate and each block below it `lr_decay` times the one above, the embeddings lowest.
    The lower layers hold general features that pre-training got right; the upper ones, and the
    new head most of all, have the most to learn about the new task. Each group's `lr_scale` says
    what share of the scheduled rate it gets. Every parameter that may train is in a group, frozen
    or not yet (gradual unfreezing freezes after the optimizer is made)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    n, top = layers_of(model), layers_of(model) + 1
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        level = depth(name, n) if lr_decay else top
        decays = p.dim() >= 2 and id(p) not in embeddings               # matrices; not biases, gains, embeddings
        label = "head" if level == top else "embeddings" if level == 0 else f"block {level - 1}"
        group = groups.setdefault((level, decays), {"params": [], "weight_decay": weight_decay if decays else 0.0,
                                                    "lr_scale": (lr_decay or 1.0) ** (top - level), "name": label})
        group["params"].append(p)
    return [groups[key] for key in sorted(groups, key=lambda k: (-k[0], not k[1]))]


OPTIMIZERS = ("adamw", "adamw8bit")
# Bytes of optimizer state per trained parameter: AdamW's two fp32 moments; or the same moments as
# 1-byte codes, plus each block of 256 codes' fp32 scale, one per moment (tensors under 4,096 values,
# biases and norms' gains, keep fp32 moments: a few kilobytes).
STATE_BYTES = {"adamw": 8, "adamw8bit": 2 + 2 * 4 / 256}


def make_optimizer(model, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8, lr_decay=None, kind="adamw"):
    """AdamW over `param_groups`; kind "adamw8bit": its moments held in 8 bits (adamw_8bit)."""
    groups = param_groups(model, weight_decay, lr_decay)
    if not any(g["params"] for g in groups):
        raise NanotuneError("nothing to train: every parameter is frozen")
    own_memory(p for g in groups for p in g["params"])
    # A parameter whose gradient is None (frozen for now) is skipped: not moved, not decayed.
    if kind == "adamw8bit":
        return adamw_8bit(groups, lr, betas, eps)
    if tricks.enabled("fused_adamw") and tricks.fuses_adamw(groups):
        return tricks.fused_adamw(groups, lr=lr, betas=betas, eps=eps)   # the same update, one pass
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def adamw_8bit(groups, lr, betas, eps):
    """AdamW with both moments stored in 8 bits (Dettmers et al., 2022: bitsandbytes' AdamW8bit):
    2 bytes of state a parameter instead of 8. Each block of 256 values of a moment is kept as
    1-byte codes into a non-linear ("dynamic") map, dense near zero where most moments lie, times
    the block's largest magnitude; a step decodes a block, takes AdamW's step in fp32 and encodes it
    again. Blocks keep one outlier from flattening the rest of the tensor, so the update stays
    within about a percent of AdamW's (tests/test_optim.py). The weights and gradients stay fp32."""
    bnb = _bitsandbytes()
    return bnb.optim.AdamW8bit(groups, lr=lr, betas=betas, eps=eps)


def format_groups(optimizer, lr):
    lines = [f"{'group':<12}{'learning rate':>14}{'weight decay':>14}{'parameters':>14}"]
    for g in optimizer.param_groups:
        size = sum(p.numel() for p in g["params"])
        lines.append(f"{g['name']:<12}{lr * g['lr_scale']:>14.2e}{g['weight_decay']:>14g}{size:>14,}")
    return "\n".join(lines)


def unfreeze_gradually(model, trainable, epoch):
    """Gradual unfreezing (ULMFiT): in the first epoch only the head trains (for GPT-2, whose head
    is a LayerNorm, also the last block), and each epoch after unfreezes the next block down, the
    embeddings last. A new head first learns on stable features, instead of sending large, random
    gradients into the pre-trained layers below it. `trainable`: the (name, parameter) pairs that
    may train at all. Depends only on the epoch, so a resumed run gets the same set. Returns the
    lowest depth that trains."""
    n = layers_of(model)
    lowest = max(0, n + 1 - epoch - (1 if hasattr(model, "lm_head") else 0))
    for name, p in trainable:
        p.requires_grad_(depth(name, n) >= lowest)
    return lowest


def lr_at(step, lr, warmup_steps, total_steps, schedule="linear"):
    """Learning rate at optimizer step `step` (0-based): linear warm-up from 0 to `lr`, then linear
    or cosine decay to 0 at `total_steps`, or constant; or one cycle (see `one_cycle`)."""
    if schedule == "onecycle":
        return one_cycle(step, lr, warmup_steps, total_steps)
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr * (1.0 - progress)


def one_cycle(step, lr, warmup_steps, total_steps):
    """The one-cycle schedule (Smith, 2018), as torch.optim.lr_scheduler.OneCycleLR computes it with
    its defaults: from lr / 25 up to lr along a cosine over the warm-up (--warmup-steps, or the
    first 30 % of the steps), then down along a cosine to lr / 25 / 10,000. The high rates in the
    middle of training explore; the long, low tail settles into a minimum."""
    start, low = lr / 25, lr / 25 / 1e4
    peak = (warmup_steps if warmup_steps else 0.3 * total_steps) - 1          # the step where the rate peaks
    anneal = lambda a, b, pct: b + (a - b) / 2 * (math.cos(math.pi * pct) + 1)
    if step <= peak:
        return anneal(start, lr, step / peak if peak > 0 else 1.0)
    end = total_steps - 1
    return anneal(lr, low, min(1.0, (step - peak) / (end - peak)) if end > peak else 1.0)
