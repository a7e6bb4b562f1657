"""Dropout on CPU: a 1-byte mask kept for backward, drawn several times faster than PyTorch's.

PyTorch's CPU dropout draws a float32 mask with `bernoulli_`, one random number at a time from
its Mersenne Twister (about 15 ns each), and keeps that mask for backward: 4 bytes for every
element of every dropped activation, several hundred MB in GPT-2 training. Here numpy's PCG64
generator makes the random bits in bulk (about 1.5 ns a mask element), each 16 bits compared with
p's threshold, and the mask kept is one byte an element. p is rounded to a multiple of 1/65,536
(0.1 becomes 0.100006) and the kept values are scaled by exactly 1 / (1 - that p), so the expected
activation is unchanged. PCG64 is seeded by one draw from torch's generator, so
`torch.manual_seed`, gradient checkpointing's recompute and resuming a run see the same masks. On
GPUs, PyTorch's fused kernel already keeps a 1-byte mask, so it is used there.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

LEVELS = 65536     # 16-bit uniform numbers


def keep_mask(shape, p, device):
    """1 (keep) with probability 1 - p, else 0, as uint8; and the scale 1 / (1 - p) for what is kept.
    uint8, not bool: multiplying a float tensor by a uint8 one runs PyTorch's vectorized kernel,
    while a bool operand (or masked_fill) takes a path 2-4x slower here."""
    n = math.prod(shape)
    drop_levels = round(p * LEVELS)
    seed = torch.randint(2**63 - 1, (), dtype=torch.int64).item()     # torch's generator decides
    bits = np.random.PCG64(seed).random_raw((n + 3) // 4)               # 64 random bits each
    keep = bits.view(np.int16)[:n] >= drop_levels - LEVELS // 2         # uniform over [-32768, 32767]
    return torch.from_numpy(keep.view(np.uint8)).view(shape).to(device), LEVELS / (LEVELS - drop_levels)


def dropout(x, p: float, training: bool = True):
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p > 0.99:
        return F.dropout(x, p, training)
    keep, scale = keep_mask(x.shape, p, x.device)
    return (x * keep).mul_(scale)             # the product keeps only the 1-byte mask for backward


class Dropout(nn.Dropout):
    """nn.Dropout with the mask above (no weights: checkpoints are unchanged)."""

    def forward(self, x):
        return dropout(x, self.p, self.training)


class DropoutThenMatmul(torch.autograd.Function):
    """dropout(probs) @ v, for attention on CPU. Backward needs the dropped probabilities; rather
    than keep them (another (B, nh, T, T) float tensor per layer), it keeps the probabilities,
    which softmax keeps for its own backward anyway, and the 1-byte mask, and drops again. The
    scale 1 / (1 - p) multiplies the (B, nh, T, hs) products, not the (B, nh, T, T) weights."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, probs, v, p):
        keep, ctx.scale = keep_mask(probs.shape, p, probs.device)      # (B, nh, T, T)
        ctx.save_for_backward(probs, keep, v)
        return ((probs * keep) @ v).mul_(ctx.scale)                     # (B, nh, T, hs)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_y):
        probs, keep, v = ctx.saved_tensors
        grad_y = grad_y * ctx.scale                                       # (B, nh, T, hs)
        grad_probs = (grad_y @ v.transpose(-2, -1)).mul_(keep)
        grad_v = (probs * keep).transpose(-2, -1) @ grad_y
        return grad_probs, grad_v, None
