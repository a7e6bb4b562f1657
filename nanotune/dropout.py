"""Dropout, the regulariser: in training, zero each activation with probability p and scale the
rest by 1 / (1 - p), so that the expected value of every activation is what evaluation (which
drops nothing) sees. The network cannot rely on any single unit, which keeps a large pre-trained
model from memorising a small fine-tuning set."""
import torch.nn as nn
import torch.nn.functional as F

from . import tricks


class Dropout(nn.Dropout):
    """nn.Dropout (no weights: checkpoints are unchanged), handing over to a faster mask on CPU."""

    def forward(self, x):
        if self.training and self.p > 0 and x.device.type == "cpu" and tricks.enabled("dropout_mask"):
            return tricks.dropout(x, self.p)
        return F.dropout(x, self.p, self.training)
