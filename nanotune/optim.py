"""What is trained and how fast: frozen parts, AdamW parameter groups, the learning-rate schedule."""
import math

import torch
import torch.nn as nn

from .errors import NanotuneError


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


def param_groups(model, weight_decay):
    """Two AdamW groups: weight decay for the matrices of linear layers only. Decaying biases,
    LayerNorm gains or embedding rows towards zero hurts and does not regularise anything useful."""
    no_decay = set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.LayerNorm)):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    decay, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (rest if name.endswith("bias") or id(p) in no_decay else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def make_optimizer(model, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8):
    groups = param_groups(model, weight_decay)
    if not any(g["params"] for g in groups):
        raise NanotuneError("nothing to train: every parameter is frozen")
    # The fused kernel updates all parameters in one pass (CPU and CUDA); plain AdamW elsewhere.
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = devices <= {"cpu", "cuda"} and all(p.is_floating_point() and type(p.data) is torch.Tensor for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def lr_at(step, lr, warmup_steps, total_steps, schedule="linear"):
    """Learning rate at optimizer step `step` (0-based): linear warm-up from 0 to `lr`, then linear
    or cosine decay to 0 at `total_steps`, or constant."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr * (1.0 - progress)
