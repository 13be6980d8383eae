"""Process-group helpers that work the same under torchrun and plain `python`.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT. Under torchrun a process group is always made,
one rank included (so `torchrun --nproc_per_node=1` runs NCCL and DDP as a multi-GPU job does); a plain `python`
process makes none. NCCL on CUDA, gloo on CPU.
"""

import os

import torch
import torch.distributed as dist

from torch_utils.cli import PeerFailed


def init(device=None):
    """Initialise the default process group if launched by torchrun. Returns the device to use."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        # Under torchrun each rank takes cuda:LOCAL_RANK; a plain process keeps the index it was given (cuda:1).
        index = int(os.environ.get("LOCAL_RANK", "0")) if launched_by_torchrun() else (device.index or 0)
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    if launched_by_torchrun() and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return device


def launched_by_torchrun():
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def backend():
    """The process group's backend ('nccl', 'gloo'), or None without a group."""
    return dist.get_backend() if is_distributed() else None


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_distributed() else 0


def get_world_size():
    return dist.get_world_size() if is_distributed() else 1


def barrier():
    if is_distributed():
        dist.barrier()


def shutdown():
    if is_distributed():
        dist.destroy_process_group()


def _collective_device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def agree(error=None):
    """Collective failure check: every rank passes the exception it caught (or None). If any rank failed, the
    failed ranks raise their own exception and the others raise PeerFailed, so no rank waits forever."""
    if is_distributed():
        failed = torch.tensor([0 if error is None else 1], device=_collective_device())
        dist.all_reduce(failed)
        if error is None and failed.item():
            raise PeerFailed()
    if error is not None:
        raise error


def rank0_first(fn):
    """fn() on rank 0, then on the other ranks (so that only rank 0 downloads into a shared cache). A failure on
    any rank stops all of them: see `agree`."""
    result = None
    for turn in (True, False):
        error = None
        if (get_rank() == 0) == turn:
            try:
                result = fn()
            except Exception as e:  # handed to agree(), which re-raises it on this rank
                error = e
        if is_distributed() or error is not None:
            agree(error)
    return result


def print0(*args, **kwargs):
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_mean(t):
    """Average a tensor over ranks (in place on a copy); identity for one process."""
    if not is_distributed():
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / get_world_size()


def broadcast_module(module, src=0):
    """Make every rank start from rank src's parameters and buffers."""
    if not is_distributed():
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=src)


def check_ranks_in_sync(net):
    """Every rank must hold the same weights (DDP averages gradients; any drift is a bug): compare per-tensor
    float64 sums and sums of squares across ranks and stop with an error on a mismatch."""
    if not is_distributed():
        return
    with torch.no_grad():
        local = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()]) for p in net.parameters()])
    gathered = [torch.zeros_like(local) for _ in range(get_world_size())]
    torch.distributed.all_gather(gathered, local)
    worst = max((g - gathered[0]).abs().max().item() for g in gathered)
    if worst != 0:
        raise RuntimeError(f"ranks hold different weights (max checksum difference {worst:g})")
    print0(f"Ranks in sync: {get_world_size()} ranks hold identical weights.")
