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
import pickle
import shutil
import signal
from pathlib import Path

import torch
import torch.distributed as dist

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
    state = {"progress": progress, "rng": rng_states()}
    if sharded:
        state |= _save_shards(folder, model, optimizer)
    else:      # one process, or DDP, whose ranks hold the same weights: rank 0's
        state |= {"model": {n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
                  "optimizer": optimizer.state_dict()}
    if rank() == 0:
        atomic_write(folder / STATE_FILE, lambda tmp: torch.save(state, tmp))
    barrier()


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


def save_and_stop(out, model, optimizer, progress, sharded, say, signum):
    """Ctrl-C or SIGTERM: save the state after this step, so that --resume continues from it."""
    save_state(Path(out) / "checkpoint", model, optimizer, progress, sharded=sharded)
    say(f"stopped by signal {signum}: the state is saved; continue with the same command plus --resume")
    return 128 + signum
