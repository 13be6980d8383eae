"""Tick logging: per-step losses averaged over a tick, the status line with its ETA, stats.jsonl and the progress
bar (design §5)."""

import collections
import json
import math
import resource
import time

import torch

from torch_utils import cli
from torch_utils import distributed as dist


def _peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class TickLog:
    """Per-step losses averaged over a tick, the status line, stats.jsonl and the progress bar."""

    def __init__(self, max_steps, device, total_kimg, cur_nimg, stats_file, start_time, progress):
        self.loss_sum = torch.zeros(max_steps - 1, device=device)
        self.loss_count = torch.zeros(max_steps - 1, device=device)
        self.device, self.total_kimg, self.stats_file, self.start_time = device, total_kimg, stats_file, start_time
        self.tick_start_nimg, self.tick_start_time = cur_nimg, time.time()
        # (time, nimg) at the end of the latest iterations. The ETA uses their rate: it leaves out the run's first
        # iteration, which pays one-time costs (kernel selection, allocations, compilation), so the ETA after tick 0
        # is not that iteration's rate spread over the whole run.
        self.marks = collections.deque(maxlen=64)
        self.bar = None
        if progress:
            from tqdm import tqdm

            # Fixed decimals for the count ("1012/2000", "12.3/50", "0.010/0.01"): a ".3g" count turns to
            # "1.01e+03" past 1000 kimg.
            decimals = min(3, max(0, 2 - math.floor(math.log10(total_kimg)))) if total_kimg > 0 else 3
            self.bar = tqdm(total=total_kimg, initial=cur_nimg / 1000, unit="kimg", dynamic_ncols=True, leave=False,
                            bar_format=f"{{l_bar}}{{bar}}| {{n:.{decimals}f}}/{{total:g}} kimg "
                                       "[{elapsed}<{remaining}]{postfix}")

    def add(self, losses):
        """losses[step][round]: the iteration's detached loss maps."""
        for i, per_round in enumerate(losses):
            for loss in per_round:
                self.loss_sum[i] += loss.mean() / len(per_round)
            self.loss_count[i] += 1

    def advance(self, cur_nimg):
        """Move the bar to cur_nimg (set, not summed: a sum of batch/1000 steps drifts past the total)."""
        self.marks.append((time.time(), cur_nimg))
        if self.bar is not None:
            self.bar.update(min(cur_nimg / 1000, self.total_kimg) - self.bar.n)

    def write(self, cur_tick, cur_nimg, lr, mode):
        """End a tick: one status line and one stats.jsonl record (rank 0), then start the next tick."""
        tick_time = time.time() - self.tick_start_time
        sec_per_kimg = tick_time / max(cur_nimg - self.tick_start_nimg, 1) * 1000
        per_step = (dist.all_reduce_mean(self.loss_sum) / self.loss_count.clamp(min=1)).tolist()
        seen = self.loss_count.tolist()
        (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
        recent = (t1 - t0) / (n1 - n0) * 1000 if n1 > n0 else sec_per_kimg
        eta = recent * max(self.total_kimg - cur_nimg / 1000, 0)
        stats = dict(tick=cur_tick, kimg=cur_nimg / 1000, sec_per_kimg=sec_per_kimg,
                     total_sec=time.time() - self.start_time, peak_mem_gb=_peak_memory_gb(self.device),
                     lr=lr, mixed_precision=mode.mixed, precision=mode.precision,
                     device=cli.machine_name(self.device), ranks=dist.get_world_size(),
                     loss={f"step{i}": v for i, (v, n) in enumerate(zip(per_step, seen)) if n > 0})
        loss_text = " ".join(f"{v:.4f}" for v, n in zip(per_step, seen) if n > 0)
        line = (f"tick {cur_tick:<4d} kimg {cur_nimg / 1000:<8.2f} loss/step [{loss_text}] sec/kimg "
                f"{sec_per_kimg:<7.2f} mem {stats['peak_mem_gb']:.2f}GB eta {cli.format_time(eta)}")
        if self.bar is not None:
            self.bar.write(line)
            self.bar.set_postfix_str(f"loss {sum(per_step) / max(1, sum(n > 0 for n in seen)):.4f}")
        elif dist.get_rank() == 0:
            print(line, flush=True)
        if self.stats_file:
            with open(self.stats_file, "a") as f:
                f.write(json.dumps(dict(stats, timestamp=time.time())) + "\n")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.loss_sum.zero_()
        self.loss_count.zero_()
        self.tick_start_nimg, self.tick_start_time = cur_nimg, time.time()

    def close(self):
        if self.bar is not None:
            self.bar.close()
