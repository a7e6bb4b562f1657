"""Which learning rate? Leslie Smith's LR range test, as fastai made it popular: train for a few
steps while the rate grows exponentially, and watch where the loss falls fastest and where it
explodes. Everything the test changes (weights, optimizer state, random numbers) is put back."""
import copy
import itertools
import math
from contextlib import contextmanager

import numpy as np
import torch

from ..errors import NanotuneError
from ..files import atomic_write, write_json

CAVEAT = ("for a pre-trained transformer the finder's suggestion is often about ten times too high: the loss"
          " falls fastest while the pre-trained weights are being pushed far from where they were, which"
          " costs accuracy later; a tenth of it is a safer start (--lr-find-check compares the two)")


@contextmanager
def restored(model, optimizer):
    """Inside the block, train as you like: afterwards the trainable weights, the optimizer's state
    and the random-number state are what they were before it."""
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer_state, rng = copy.deepcopy(optimizer.state_dict()), torch.get_rng_state()
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
        optimizer.load_state_dict(optimizer_state)
        torch.set_rng_state(rng)


def lr_range_test(model, optimizer, train_step, start=1e-7, end=1.0, steps=100, beta=0.98, explode=4.0):
    """Call train_step(lr) (one optimizer step at that rate; it returns the step's mean loss) with
    the rate growing from `start` to `end` over `steps` steps, until the smoothed loss exceeds
    `explode` times its lowest. Returns {"lr", "loss", "smoothed"} lists. The smoothed loss is an
    exponential moving average with bias correction (the raw loss of one batch is too noisy).
    Nothing of the test leaks into training: see `restored`."""
    lrs, losses, smoothed, average, best = [], [], [], 0.0, math.inf
    with restored(model, optimizer):
        for i in range(steps):
            lr = start * (end / start) ** (i / max(steps - 1, 1))
            loss = float(train_step(lr))
            average = beta * average + (1 - beta) * loss
            value = average / (1 - beta ** (i + 1))
            lrs.append(lr), losses.append(loss), smoothed.append(value)
            if not math.isfinite(value) or value > explode * best:
                break
            best = min(best, value)
    return {"lr": lrs, "loss": losses, "smoothed": smoothed}


def suggestions(result, skip=5):
    """Two readings of the curve: `steepest`, the rate where the smoothed loss falls fastest against
    log(rate); `valley`, the middle of the longest stretch over which it keeps falling (steadier when
    the curve is noisy). The first `skip` points, still dominated by the average's start, and the
    points after the minimum are not considered."""
    lrs, smooth = np.array(result["lr"]), np.array(result["smoothed"])
    last = int(np.nanargmin(np.where(np.isfinite(smooth), smooth, np.inf))) + 1
    lrs, smooth = lrs[:last], smooth[:last]
    if len(smooth) < skip + 3:
        return None
    slope = np.gradient(smooth, np.log(lrs))
    steepest = skip + int(np.argmin(slope[skip:]))
    # the longest strictly falling subsequence of the smoothed loss, by dynamic programming
    length, previous = [1] * len(smooth), [-1] * len(smooth)
    for i in range(len(smooth)):
        for j in range(i):
            if smooth[i] < smooth[j] and length[j] + 1 > length[i]:
                length[i], previous[i] = length[j] + 1, j
    end = int(np.argmax(length))
    first = end
    while previous[first] != -1:
        first = previous[first]
    valley = (first + end) // 2
    return {"steepest": float(lrs[steepest]), "valley": float(lrs[valley]),
            "steepest_index": steepest, "valley_index": valley, "falling": (first, end)}


def format_table(result, suggested, rows=12):
    lines = [f"{'learning rate':>14}{'loss':>10}{'smoothed':>10}"]
    n = len(result["lr"])
    marks = {}
    if suggested:
        marks = {suggested["steepest_index"]: "  <- steepest", suggested["valley_index"]: "  <- valley"}
    picks = sorted(set(np.linspace(0, n - 1, min(rows, n)).round().astype(int).tolist()) | set(marks))
    for i in picks:
        mark = marks.get(i, "")
        lines.append(f"{result['lr'][i]:>14.2e}{result['loss'][i]:>10.4f}{result['smoothed'][i]:>10.4f}{mark}")
    return "\n".join(lines)


def plot(result, suggested, path):
    """The smoothed loss against the rate (log scale), the raw loss faint, the suggestions marked."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(result["lr"], result["loss"], alpha=0.3, label="loss")
    ax.plot(result["lr"], result["smoothed"], label="smoothed loss")
    if suggested:
        for key, colour in (("steepest", "tab:red"), ("valley", "tab:green")):
            ax.axvline(suggested[key], color=colour, linestyle="--", label=f"{key} {suggested[key]:.1e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return True


def run(model, optimizer, step, batches, validate, out, check=False, say=print):
    """--lr-find: the range test on the training data, its table and plot (OUT/lr_find.json and
    .png, never the run's own records), a suggested rate; with `check` (--lr-find-check), a few
    steps at the suggestion and at a tenth of it. `step(indices, lr)` takes one optimizer step on
    those examples and returns its mean loss (None when they have nothing to score: the next batch
    is taken); `validate()` gives the validation scores, or {}.
    The weights and the optimizer are put back after each: nothing here is trained for real."""
    cycle = itertools.cycle(batches)

    def step_at(lr):
        loss = None
        while loss is None:
            loss = step(next(cycle), lr)
        return loss
    result = lr_range_test(model, optimizer, step_at)
    suggested = suggestions(result)
    say(format_table(result, suggested))
    write_json(result | {"suggestions": suggested}, out / "lr_find.json")
    if plot(result, suggested, out / "lr_find.png"):
        say(f"plot: {out / 'lr_find.png'}")
    if suggested is None:
        raise NanotuneError("the loss exploded within the first steps of the range test: nothing to suggest;"
                            " check the data, or lower --max-grad-norm")
    say(f"suggested learning rate: {suggested['valley']:.1e} (valley), {suggested['steepest']:.1e} (steepest descent)"
        f"\nnote: {CAVEAT}")
    if check:
        steps = min(50, len(batches))
        for lr in (suggested["valley"], suggested["valley"] / 10):
            with restored(model, optimizer):
                losses = [step_at(lr) for _ in range(steps)]
                scores = validate()
            say(f"{steps} steps at {lr:.1e}: training loss {sum(losses[-5:]) / len(losses[-5:]):.4f} over the last 5"
                + (f", validation loss {scores['loss']:.4f}" if scores else ""))
    return 0
