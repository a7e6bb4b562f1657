"""The run's log: the running training loss, one JSON line per event, and a loss curve."""
import json
import time
from pathlib import Path

import torch

from .distributed import sum_across


class RunningLoss:
    """The mean training loss and the tokens per second since the last report, over all ranks.
    The loss is added up on the device and read only when reported: reading it makes the CPU
    wait for the device to finish its queued work."""

    def __init__(self, device):
        self.device = device
        self._reset()

    def _reset(self):
        self.loss, self.count, self.tokens = torch.zeros((), device=self.device), 0, 0
        self.start = time.time()

    def add(self, summed_loss, count, batches):
        self.loss += summed_loss
        self.count += count
        self.tokens += sum(int(b["attention_mask"].sum()) if b["attention_mask"] is not None else b["input_ids"].numel()
                           for b in batches)

    def read(self, device):
        loss, count, tokens = sum_across(self.loss.item(), self.count, self.tokens, device=device)
        result = loss / count, tokens / (time.time() - self.start)
        self._reset()
        return result


class MetricsLog:
    """Appends every event to OUT/metrics.jsonl; draws OUT/loss.png if matplotlib is installed."""

    def __init__(self, out: Path, enabled=True):
        self.path = Path(out) / "metrics.jsonl"
        self.start = time.time()
        self.enabled = enabled      # only one process of a multi-process run writes

    def log(self, event: str, **values):
        if not self.enabled:
            return
        record = {"event": event, "time": round(time.time() - self.start, 2), **values}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self):
        if not self.enabled:
            return None
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        records = [json.loads(line) for line in self.path.read_text().splitlines()]
        train = [r for r in records if r["event"] == "train"]
        evals = [r for r in records if r["event"] == "eval"]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="training loss")
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="validation loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.path.parent / "loss.png", dpi=100)
        plt.close(fig)
        return self.path.parent / "loss.png"
