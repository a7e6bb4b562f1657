"""Training on several processes with PyTorch's own engine, started by `torchrun`.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK in each process. Every process (rank) holds the
model, takes its own share of each batch, and the gradients are averaged across ranks in backward:
DistributedDataParallel (DDP) when the model fits one device, FSDP (each rank keeps a shard of
every block's weights) when it does not. Backend: NCCL on GPUs, Gloo on CPUs.
"""
import contextlib
import os

import torch
import torch.distributed as dist

from ..hub import own_memory


def setup(device_name=None):
    """(device, rank, world_size); starts the process group when run under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return torch.device(device_name or ("cuda" if torch.cuda.is_available() else "cpu")), 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available() and device_name != "cpu":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device, dist.get_rank(), world


def wrap(model, device, fsdp=False):
    """The model as the training loop sees it. FSDP shards each transformer block separately, so
    only one block's full weights exist at a time in forward and backward. The weights that train
    get memory of their own first (hub.own_memory): DDP and FSDP take hold of them as they are."""
    own_memory(p for p in model.parameters() if p.requires_grad)
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList)):
            fully_shard(block)
        return fully_shard(model)
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def sum_across(*values, device):
    """Sum numbers over all ranks (a no-op in one process): token counts, losses, stop requests."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def loss_divisor(local_count, device):
    """What each rank divides its summed loss by before backward: the scored tokens (or examples) of
    the whole optimizer step on all ranks, over the number of ranks. DDP averages the ranks'
    gradients, so that average is then the gradient of the mean over every token of the step; in
    one process this is simply the step's count."""
    (total,) = sum_across(local_count, device=device)
    return total / world_size()


def gradient_sync(model, sync: bool):
    """DDP averages gradients across ranks in every backward. Under gradient accumulation only the
    step's last micro-batch needs to: the others skip it (`no_sync`) and add to the local gradient."""
    if not sync and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def full_state_dict(model, fsdp):
    """Every weight in full, on the CPU of rank 0 (FSDP gathers the shards; every rank must call it)."""
    if not fsdp:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def barrier():
    if dist.is_initialized():
        dist.barrier()


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()
