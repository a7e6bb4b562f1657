"""The run's log: the running training loss, one JSON line per event, and a loss curve."""
import json
import math
import time
from pathlib import Path

import torch

from ..errors import NanotuneError
from ..files import append_line
from .distributed import sum_across


class RunningLoss:
    """The mean training loss, tokens per second, and the gradient's norm and how often it was
    clipped, since the last report, over all ranks. The loss is added up on the device and read
    only when reported: reading it makes the CPU wait for the device to finish its queued work."""

    def __init__(self, device):
        self.device = device
        self._reset()

    def _reset(self):
        self.loss, self.count, self.tokens = torch.zeros((), device=self.device), 0, 0
        self.norm, self.clipped = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        self.steps = 0
        self.start = time.time()

    def add(self, summed_loss, count, batches, norm=None, max_norm=None):
        self.loss += summed_loss
        self.count += count
        self.tokens += sum(int(b["attention_mask"].sum()) if b["attention_mask"] is not None else b["input_ids"].numel()
                           for b in batches)
        if norm is not None:
            if hasattr(norm, "full_tensor"):      # under --fsdp the norm is a distributed tensor
                norm = norm.full_tensor()
            self.norm += norm
            self.clipped += norm > max_norm
            self.steps += 1

    def read(self, device):
        """(mean loss, tokens per second, {"grad_norm", "clipped"} or {})."""
        loss, count, tokens = sum_across(self.loss.item(), self.count, self.tokens, device=device)
        norms = {}
        if self.steps:
            norms = {"grad_norm": self.norm.item() / self.steps, "clipped": self.clipped.item() / self.steps}
        result = loss / count, tokens / (time.time() - self.start), norms
        self._reset()
        return result


class MetricsLog:
    """Appends every event to OUT/metrics.jsonl; draws OUT/training.png if matplotlib is installed."""

    def __init__(self, out: Path, enabled=True):
        self.path = Path(out) / "metrics.jsonl"
        self.start = time.time()
        self.enabled = enabled      # only one process of a multi-process run writes

    def log(self, event: str, **values):
        if not self.enabled:
            return
        record = {"event": event, "time": round(time.time() - self.start, 2), **values}
        append_line(self.path, json.dumps(record))

    def plot(self):
        """Training and validation loss, the learning rate and the gradient's norm against the
        step, one figure, OUT/training.png. None without matplotlib (an optional extra)."""
        if not self.enabled:
            return None
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        from ..files import atomic_write
        records = [json.loads(line) for line in self.path.read_text().splitlines()]
        train = [r for r in records if r["event"] == "train"]
        evals = [r for r in records if r["event"] == "eval"]
        fig, (loss, lr, norm) = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
        loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="training loss")
        loss.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="validation loss")
        loss.set_ylabel("loss")
        loss.legend()
        lr.plot([r["step"] for r in train], [r["lr"] for r in train])
        lr.set_ylabel("learning rate")
        norm.plot([r["step"] for r in train if "grad_norm" in r], [r["grad_norm"] for r in train if "grad_norm" in r])
        norm.set_ylabel("gradient norm (before clipping)")
        norm.set_xlabel("optimizer step")
        fig.tight_layout()
        atomic_write(self.path.parent / "training.png", lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        plt.close(fig)
        return self.path.parent / "training.png"


def report_training(running, bar, log, epoch, step, lr, device):
    """The mean loss since the last report, on the progress bar and in metrics.jsonl; a loss
    that is no longer finite stops the run before anything of it is saved."""
    loss, speed, norms = running.read(device)
    if not math.isfinite(loss):
        bar.close()
        raise NanotuneError(f"the loss became {loss} at step {step}; nothing was saved from this step on."
                            " Lower --lr, keep --max-grad-norm on, or check the data")
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{speed:,.0f}")
    log.log("train", epoch=epoch + 1, step=step, loss=loss, lr=lr, tokens_per_s=speed, **norms)
