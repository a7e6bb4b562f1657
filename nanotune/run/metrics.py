"""The run's log: what it says about its data and model, the running training loss, one JSON line
per event, and a loss curve."""
import importlib.util
import json
import math
import time
from pathlib import Path

import torch

from ..data import padding_note
from ..errors import NanotuneError
from ..files import append_line
from ..quantize import footprint_bytes, parameter_count
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
        self.scores = {}                # what a loss leaves in its batches' "metrics" (DPO's rewards), summed
        self.start = time.time()

    def add(self, summed_loss, count, batches, norm=None, max_norm=None):
        self.loss += summed_loss
        self.count += count
        self.tokens += sum(int(b["attention_mask"].sum()) if b["attention_mask"] is not None else b["input_ids"].numel()
                           for b in batches)
        for batch in batches:
            for name, value in batch.get("metrics", {}).items():
                self.scores[name] = self.scores.get(name, 0) + value
        if norm is not None:
            if hasattr(norm, "full_tensor"):      # under --fsdp the norm is a distributed tensor
                norm = norm.full_tensor()
            self.norm += norm
            self.clipped += norm > max_norm
            self.steps += 1

    def read(self, device):
        """(mean loss, or None when nothing was scored since the last report; tokens per second;
        {"grad_norm", "clipped"} or {}, and the loss's own scores)."""
        loss, count, tokens = sum_across(self.loss.item(), self.count, self.tokens, device=device)
        norms = {}
        if self.steps:
            norms = {"grad_norm": self.norm.item() / self.steps, "clipped": self.clipped.item() / self.steps}
        if self.scores and count:       # means over the same pairs as the loss
            norms |= dict(zip(self.scores, (v / count for v in sum_across(*self.scores.values(), device=device))))
        result = loss / count if count else None, tokens / (time.time() - self.start), norms
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
        """Training and validation loss, the learning rate and the gradient's norm (and DPO's rewards)
        against the step, one figure, OUT/training.png. None without matplotlib (an optional extra)."""
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
        rewards = [r for r in train if "rewards/margins" in r]        # preference tuning: DPO's rewards too
        fig, axes = plt.subplots(3 + bool(rewards), 1, figsize=(7, 8 + 2.5 * bool(rewards)), sharex=True)
        loss, lr, norm = axes[:3]
        loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="training loss")
        loss.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="validation loss")
        loss.set_ylabel("loss")
        loss.legend()
        lr.plot([r["step"] for r in train], [r["lr"] for r in train])
        lr.set_ylabel("learning rate")
        norm.plot([r["step"] for r in train if "grad_norm" in r], [r["grad_norm"] for r in train if "grad_norm" in r])
        norm.set_ylabel("gradient norm (before clipping)")
        for name in ("rewards/chosen", "rewards/rejected", "rewards/margins") if rewards else ():
            axes[3].plot([r["step"] for r in rewards], [r[name] for r in rewards], label=name)
            axes[3].set_ylabel("reward (beta x log-ratio)")
            axes[3].legend()
        axes[-1].set_xlabel("optimizer step")
        fig.tight_layout()
        atomic_write(self.path.parent / "training.png", lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        plt.close(fig)
        return self.path.parent / "training.png"


def report_training(running, bar, log, epoch, step, lr, device):
    """The mean loss since the last report, on the progress bar and in metrics.jsonl; a loss
    that is no longer finite stops the run before anything of it is saved."""
    loss, speed, norms = running.read(device)
    if loss is None:                      # no token scored since the last report: no mean to show
        return
    if not math.isfinite(loss):
        bar.close()
        raise NanotuneError(f"the loss became {loss} at step {step}; nothing was saved from this step on."
                            " Lower --lr, keep --max-grad-norm on, or check the data")
    accuracy = {"acc": f"{norms['rewards/accuracies']:.2f}"} if "rewards/accuracies" in norms else {}
    bar.set_postfix(loss=f"{loss:.4f}", **accuracy, lr=f"{lr:.2e}", tok_s=f"{speed:,.0f}")
    log.log("train", epoch=epoch + 1, step=step, loss=loss, lr=lr, tokens_per_s=speed, **norms)


def describe_data(args, train_examples, val_examples, train_ids, labels, too_long, max_length, task):
    """The data line train.py prints once tokenized: examples, tokens, what was cut, the padding."""
    chats = bool(train_examples) and "messages" in train_examples[0]
    cut = "cut at the end" if chats else "split into windows" if task == "lm" else "truncated"
    lengths = [len(ids) for ids in train_ids]
    return (f"data: {len(train_examples)} training and {len(val_examples)} validation examples,"
            f" {sum(lengths):,} training tokens"
            + (f", labels {labels}" if labels else "")
            + (f"; {too_long} examples longer than {max_length} tokens were {cut}" if too_long else "")
            + "\n" + padding_note(lengths, args.batch_size, args.seed, args.group_by_length, args.pack))



def describe_model(args, run, model, steps_per_epoch, total_steps):
    """What trains, where, in what precision, for how many steps; and what the settings overlook."""
    trainable, total = sum(p.numel() for p in model.parameters() if p.requires_grad), parameter_count(model)
    run.print(f"model: {args.model} ({run.task}), {trainable:,} of {total:,} parameters trainable"
              f" ({trainable / total:.2%}), {footprint_bytes(model) / 2**20:,.1f} MiB in memory (fp32:"
              f" {total * 4 / 2**20:,.1f} MiB), on {run.device} ({'bf16 autocast' if run.bf16 else 'fp32'});"
              f" {args.epochs} epochs of {steps_per_epoch} steps"
              + (f" on each of {run.world} ranks" if run.world > 1 else ""))
    if args.warmup_steps >= total_steps:
        run.print(f"note: --warmup-steps {args.warmup_steps} is not shorter than the run's {total_steps} optimizer"
                  " steps: the rate would still be rising when training ends; use fewer (a tenth of the steps is"
                  " common)")
    if run.main_process and importlib.util.find_spec("matplotlib") is None:
        run.print("note: pip install matplotlib to get OUT/training.png, the loss, learning rate and gradient norm"
                  " drawn after every epoch")
