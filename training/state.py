"""Training-state dumps for resuming (`--dump`, `--resume`).

A dump holds the student's weights, the optimizer (with its current learning rate, so the LR phase survives),
the progress counters, the SFD-v step generator and every rank's RNG states. It is a plain torch file of tensors,
numbers and containers, so it loads with `weights_only=True` (no code runs), and it is written to a temporary
name and renamed, so a kill mid-write never leaves a truncated dump behind.
"""

import glob
import json
import os
import random
import re

import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist

DUMP_PATTERN = "training-state-*.pt"


def dump_path(run_dir, cur_nimg):
    return os.path.join(run_dir, f"training-state-{cur_nimg // 1000:06d}.pt")


def capture_rng(device):
    np_state = np.random.get_state()
    state = dict(torch=torch.get_rng_state(), numpy=[np_state[0], np_state[1].tolist(), *np_state[2:]])
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state, device):
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_training_state(path, *, net, optimizer, cur_nimg, cur_tick, step_rng, use_mixed, rank_rng):
    state = dict(
        net={k: v.detach().cpu() for k, v in net.state_dict().items()},
        optimizer=optimizer.state_dict(),
        cur_nimg=int(cur_nimg),
        cur_tick=int(cur_tick),
        step_rng=step_rng.getstate(),
        use_mixed=bool(use_mixed),
        rank_rng=rank_rng,
    )
    with dnnlib.util.atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_training_state(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read training state {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def dump_progress(path):
    """Trajectories done (cur_nimg) when a dump was written, read without loading its tensors into memory."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["cur_nimg"])
    except Exception as e:
        raise ValueError(f"cannot read training state {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def restore_step_rng(step_rng: random.Random, state):
    version, internal, gauss = state
    step_rng.setstate((version, tuple(internal), gauss))


def latest_dump(run_dir):
    dumps = glob.glob(os.path.join(run_dir, DUMP_PATTERN))
    if not dumps:
        return None
    return max(dumps, key=lambda p: int(re.search(r"training-state-(\d+)", p).group(1)))


def trim_stats(stats_path, kimg):
    """Keep only the complete stats lines up to `kimg` (lines written after the dump are re-done on resume)."""
    if not os.path.isfile(stats_path):
        return
    kept = []
    with open(stats_path) as f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut short by the kill
            if entry.get("kimg", float("inf")) <= kimg + 1e-9:
                kept.append(json.dumps(entry) + "\n")
    dnnlib.util.write_atomic(stats_path, "".join(kept))


def remove_stale_temporaries(run_dir):
    """Temporary files left by a killed run (its writes go to `name.tmpPID` and are renamed when complete)."""
    for path in glob.glob(os.path.join(run_dir, "*.tmp*")) + glob.glob(os.path.join(run_dir, ".*.tmp*")):
        os.remove(path)


def resume(path, net, optimizer, step_rng, mode, device, run_dir, stats_file):
    """Load a training-state dump into the run; returns (cur_nimg, cur_tick)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    state = load_training_state(path)
    net.load_state_dict(state["net"])
    optimizer.load_state_dict(state["optimizer"])  # carries the current LR, i.e. the LR phase
    restore_step_rng(step_rng, state["step_rng"])
    if not state["use_mixed"]:
        mode.fall_back_to_fp32()
    if len(state["rank_rng"]) == world:
        restore_rng(state["rank_rng"][rank], device)
    else:
        dist.print0(f"Note: the dump was written by {len(state['rank_rng'])} ranks and this run has {world}: "
                    f"the per-rank random streams (latents) start afresh instead of continuing.")
    if run_dir:
        remove_stale_temporaries(run_dir)
        trim_stats(stats_file, state["cur_nimg"] / 1000)
    dist.print0(f"Resuming from {path} at {state['cur_nimg'] / 1000:g} kimg (tick {state['cur_tick']}).")
    return state["cur_nimg"], state["cur_tick"]


def dump_state(run_dir, net, optimizer, cur_nimg, cur_tick, step_rng, mode, device):
    """Write a resumable training state (rank 0), with every rank's random streams."""
    rank_rng = [capture_rng(device)]
    if dist.is_distributed():
        rank_rng = [None] * dist.get_world_size()
        torch.distributed.all_gather_object(rank_rng, capture_rng(device))
    if dist.get_rank() == 0 and run_dir:
        save_training_state(
            dump_path(run_dir, cur_nimg), net=net, optimizer=optimizer,
            cur_nimg=cur_nimg, cur_tick=cur_tick, step_rng=step_rng, use_mixed=mode.mixed, rank_rng=rank_rng)
    dist.barrier()
