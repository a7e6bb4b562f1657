"""Training state for exact resumption, written atomically.

A checkpoint is one plain dict: trainable weights, optimizer state, where the run stands
(epoch, step, best score) and every rank's random-number state, saved with torch.save and read
back with `weights_only=True`, which loads tensors and plain containers and refuses to run
pickled code.

Under FSDP no rank holds the whole model, so the weights and the optimizer's moments are saved as
shards, one file per rank, with PyTorch's distributed checkpoint (`torch.distributed.checkpoint`),
which can reload them onto any number of ranks. The shards go into one of two folders in turn,
and `training_state.pt` names the one that is complete: it is written last, atomically, so a
kill at any moment leaves the previous state whole.
"""
import copy
import os
import pickle
import shutil
import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from .. import tricks
from ..errors import NanotuneError
from ..files import atomic_write, cannot_write
from .distributed import barrier, rank, sum_across

STATE_FILE = "training_state.pt"
SHARD_FOLDERS = ("sharded-a", "sharded-b")      # FSDP: the shards of this state and of the one before


def rng_states():
    """Every rank's random-number state (dropout masks continue where they stopped on each rank)."""
    mine = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    if not dist.is_initialized():
        return [mine]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


def save_state(folder, model, optimizer, progress: dict, sharded=False):
    """Every rank calls this. progress: epoch, step_in_epoch, step, best, ... (plain numbers)."""
    folder = Path(folder)
    if sharded:
        state = {"progress": progress, "rng": rng_states()} | _save_shards(folder, model, optimizer)
    else:      # one process, or DDP, whose ranks hold the same weights: rank 0's
        state = training_state(model, optimizer, progress)
    if rank() == 0:
        write_state(folder, state)
    barrier()


def training_state(model, optimizer, progress, frozen=None):
    """The checkpoint's dict: trainable weights, AdamW's state, where the run stands, every rank's
    random state. `frozen` ({id(parameter): its copy}): weights copied already, and the optimizer's
    state copied too, so that training may go on while the dict is written."""
    weights = {n: (p.detach() if frozen is None else frozen[id(p)]) for n, p in model.named_parameters()
               if p.requires_grad}
    moments = optimizer.state_dict() if frozen is None else copy.deepcopy(optimizer.state_dict())
    return {"progress": dict(progress), "rng": rng_states(), "model": weights, "optimizer": moments,
            "optim": optimizer_kind(optimizer)}


def optimizer_kind(optimizer):
    """--optim's value for this optimizer: AdamW's fp32 moments and the 8-bit ones do not load into
    each other."""
    return "adamw8bit" if type(optimizer).__name__ == "AdamW8bit" else "adamw"


def write_state(folder, state):
    atomic_write(Path(folder) / STATE_FILE, lambda tmp: torch.save(state, tmp))


def _save_shards(folder, model, optimizer):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    current = _saved(folder).get("sharded") if rank() == 0 else None
    name = [n for n in SHARD_FOLDERS if n != current][0] if rank() == 0 else None
    names = [name]
    dist.broadcast_object_list(names, src=0)
    target = folder / names[0]
    if rank() == 0:           # the older of the two states: no longer named by training_state.pt
        try:
            shutil.rmtree(target, ignore_errors=False) if target.exists() else None
            target.mkdir(parents=True)
        except OSError as e:
            raise cannot_write(target, e) from None
    barrier()
    weights, moments = get_state_dict(model, optimizer)
    # Only tensors go into the shards: DCP stores anything else pickled, and reads it back with
    # full unpickling. The optimizer's settings (plain numbers) go into training_state.pt.
    dcp.save({"model": weights, "optimizer": moments["state"]}, storage_writer=dcp.FileSystemWriter(target))
    return {"sharded": names[0], "param_groups": moments["param_groups"]}


def _saved(folder):
    path = Path(folder) / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return {}
    except Exception as e:
        reason = str(e).splitlines()[0]
        raise NanotuneError(f"--resume: {path} cannot be read ({reason}): start the run again") from None


def load_state(folder, model, optimizer, sharded=False) -> dict:
    """Restore weights, optimizer and random state; return the saved progress."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise NanotuneError(f"--resume: no {STATE_FILE} in {folder}: start without --resume, or point --out"
                            " at the interrupted run")
    state = _saved(folder)
    if sharded != ("sharded" in state):
        saved = "with --fsdp (its weights are in shards)" if "sharded" in state else "without --fsdp"
        raise NanotuneError(f"--resume: the run in {folder} was saved {saved}: resume it {saved.split(' (')[0]}")
    saved_with = state.get("optim", "adamw")                  # (states saved before --optim: AdamW's)
    if saved_with != optimizer_kind(optimizer):
        raise NanotuneError(f"--resume: the run in {folder} was saved with --optim {saved_with}: resume it with"
                            f" --optim {saved_with}")
    if sharded:
        _load_shards(Path(folder) / state["sharded"], model, optimizer, state["param_groups"])
    else:
        params = dict(model.named_parameters())
        for name, tensor in state["model"].items():
            if name not in params or params[name].shape != tensor.shape:
                raise NanotuneError(f"--resume: the checkpoint in {folder} does not fit this model ({name}):"
                                    " resume with the same model and options")
            with torch.no_grad():
                params[name].copy_(tensor)
        optimizer.load_state_dict(state["optimizer"])
    rng = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
    mine = rng[rank()] if rank() < len(rng) else rng[0]     # a run resumed on fewer or more ranks
    torch.set_rng_state(mine["torch"])
    if mine["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(mine["cuda"])
    return state["progress"]


def _load_shards(target, model, optimizer, param_groups):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    weights, moments = get_state_dict(model, optimizer)       # the layout to read into (made on every rank)
    try:
        dcp.load({"model": weights, "optimizer": moments["state"]}, storage_reader=shard_reader(target))
    except Exception as e:
        raise NanotuneError(f"--resume: the shards in {target} cannot be read ({str(e).splitlines()[-1]}):"
                            " resume with the same model and options, or start the run again") from None
    set_state_dict(model, optimizer, model_state_dict=weights,
                   optim_state_dict={"state": moments["state"], "param_groups": param_groups})


class CheckpointDescription(pickle.Unpickler):
    """Reads DCP's `.metadata` file, a pickle, building only the classes a checkpoint's description
    is made of: unpickling anything else could run code."""
    ALLOWED = {("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "TensorProperties", "BytesStorageMetadata",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")} | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
        ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath")}

    def find_class(self, module, name):
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in self.ALLOWED or is_dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's description")


def shard_reader(path):
    """DCP's file reader, reading its metadata with CheckpointDescription."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with open(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
                metadata = CheckpointDescription(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata
    return SafeReader(path)


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


class Saver:
    """Step 7 of train.fit, one call an epoch: `save` writes the model when it improved (the best
    epoch so far), then the training state to resume from. The model first: a kill between the two
    redoes the epoch, and the state never runs ahead of the model. Nothing that is not finite is
    ever written: a model whose weights hold nan or inf stops the run instead.

    The plain version writes both in place while training waits. Its twin, the `background_saving`
    trick (where saves_in_background allows it, and never for the last epoch, which has nothing to
    overlap): the same two files written by a thread while the next epoch trains. Why it may: what
    the files hold is copied first (the weights, AdamW's moments, the random state), so they hold
    the epoch's end whatever training does next: the same tensors the plain version writes
    (tests/test_tricks.py compares them). Each file is written atomically, so a kill at any moment
    leaves the last complete one. One write at a time: `save` waits for the one before, and `wait`
    (before the run stops or ends) for the last. The copies cost memory as large as what they copy,
    for the seconds of the write (the memory estimate counts them); a write that fails stops the run
    at the next `save` or `wait`, with the one line every write error gets.

    `save_model(weights)` writes the model (weights None: the model's own tensors); `background`:
    saves_in_background's answer; `whole_model`: the model file holds every weight (not a LoRA
    adapter's few)."""

    def __init__(self, out, model, optimizer, save_model, background=False, sharded=False, whole_model=True):
        self.out, self.model, self.optimizer, self.save_model = Path(out), model, optimizer, save_model
        self.background, self.sharded, self.whole_model = background, sharded, whole_model
        self.thread, self.error = None, None

    def save(self, improved, progress, last=False):
        check_finite(self.model, progress)
        if tricks.enabled("background_saving") and self.background and not last:
            return self._save_in_background(improved, progress)
        self.wait()
        if improved:
            self.save_model(None)
        save_state(self.out / "checkpoint", self.model, self.optimizer, progress, sharded=self.sharded)

    def stop(self, progress, signum, say):
        """Ctrl-C or SIGTERM: save the state after this step, so that --resume continues from it."""
        self.wait()
        check_finite(self.model, progress)
        save_state(self.out / "checkpoint", self.model, self.optimizer, progress, sharded=self.sharded)
        say(f"stopped by signal {signum}: the state is saved; continue with the same command plus --resume")
        return 128 + signum

    def _save_in_background(self, improved, progress):
        self.wait()
        copies = {}                             # {id(tensor): its copy}; a tied weight is one tensor
        for t in self.model.state_dict(keep_vars=True).values():
            if t.requires_grad or (improved and self.whole_model):
                copies.setdefault(id(t), t.detach().clone())
        weights = {n: copies[id(t)] for n, t in self.model.state_dict(keep_vars=True).items() if id(t) in copies}
        state = training_state(self.model, self.optimizer, progress, copies)
        self.thread = threading.Thread(target=self._write, args=(weights if improved else None, state))
        self.thread.start()

    def _write(self, weights, state):
        try:
            if weights is not None:
                self.save_model(weights)
            write_state(self.out / "checkpoint", state)
        except BaseException as e:          # raised in the training loop, at the next save or wait
            self.error = e

    def wait(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def check_finite(model, progress):
    """A model with a nan or inf weight is never saved: the run stops, naming the first such weight."""
    for name, p in model.named_parameters():
        local = p.detach().to_local() if hasattr(p, "to_local") else p.detach()     # FSDP: this rank's shard
        if p.requires_grad and p.is_floating_point() and not bool(torch.isfinite(local).all()):
            raise NanotuneError(f"the weight {name} holds nan or inf after step {progress.get('step')}, so nothing"
                                " of this run from that point is saved (the last saved model is unchanged): training"
                                " diverged; lower --lr, keep --max-grad-norm on, or check the data")


def saves_in_background(run, epochs) -> bool:
    """Whether the background_saving trick may serve train.fit's Saver: one process (under DDP or
    FSDP every rank takes part in a save), more than one epoch (the last epoch's save has nothing to
    overlap), and a processor left for the writer. Writing 1.4 GB (GPT-2 124M's weights and AdamW's
    moments) is seconds of work for a CPU: the kernel copies every byte into its page cache. Training
    on a GPU leaves the CPU to it; training on the CPU with a PyTorch thread on every core does not,
    and there a write beside training slows the steps by about as much as it saves (bench/README.md).
    So on a CPU: only when PyTorch runs on fewer threads than there are cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    spare = run.device.type != "cpu" or torch.get_num_threads() < cores
    return run.world == 1 and epochs > 1 and spare
