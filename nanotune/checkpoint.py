"""Training state for exact resumption, written atomically.

A checkpoint is one plain dict: trainable weights, optimizer state, where the run stands
(epoch, step, best score) and the random-number state, saved with torch.save and read back with
`weights_only=True`, which loads tensors and plain containers and refuses to run pickled code.
"""
import signal
from pathlib import Path

import torch

from .distributed import sum_across
from .errors import NanotuneError
from .files import atomic_write

STATE_FILE = "training_state.pt"


def save_state(folder, model, optimizer, progress: dict):
    """progress: epoch, step_in_epoch, step, best, ... (plain numbers and strings)."""
    state = {
        "model": {n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "progress": progress,
        "rng": {"torch": torch.get_rng_state(),     # dropout masks continue where they stopped
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }
    atomic_write(Path(folder) / STATE_FILE, lambda tmp: torch.save(state, tmp))


def load_state(folder, model, optimizer) -> dict:
    """Restore weights, optimizer and random state; return the saved progress."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise NanotuneError(f"--resume: no {STATE_FILE} in {folder}: start without --resume, or point --out at the interrupted run")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise NanotuneError(f"--resume: {path} cannot be read ({str(e).splitlines()[0]}): start the run again") from None
    params = dict(model.named_parameters())
    for name, tensor in state["model"].items():
        if name not in params or params[name].shape != tensor.shape:
            raise NanotuneError(f"--resume: the checkpoint in {folder} does not fit this model ({name}): resume with the same model and options")
        with torch.no_grad():
            params[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["progress"]


class StopSignals:
    """Ctrl-C or SIGTERM during training: finish the current optimizer step, save a resumable
    state, then stop (rather than dying mid-step and losing everything since the last epoch)."""

    def __init__(self):
        self.received = None
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._receive)

    def _receive(self, signum, frame):
        self.received = signum

    def requested(self, device) -> bool:
        """Asked on every rank after every step, so that all ranks stop at the same one."""
        return bool(sum_across(self.received is not None, device=device)[0])
