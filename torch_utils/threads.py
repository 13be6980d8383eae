"""CPU threads for a run on a shared machine.

torch runs its CPU operators on as many OpenMP threads as the process may use. When other processes already keep
those cores busy, the extra threads spin at every barrier while they wait for a core: on a 2-core machine with two
busy neighbours, 2 threads distilled the quickstart at about 200 s/kimg against about 110 s/kimg for 1 thread
(about 50 s/kimg on the idle machine). So a CPU run measures how busy the machine is at its start and uses only the
cores that are free (at least one). OMP_NUM_THREADS, when set, is the user's choice and is kept.
"""

import os
import time


def _cpu_times(path="/proc/stat"):
    """(busy, total) jiffies of the machine and the number of CPUs that /proc/stat lists."""
    with open(path) as f:
        lines = f.read().splitlines()
    fields = [int(v) for v in lines[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return sum(fields) - idle, sum(fields), cpus


def busy_cores(window=0.3, read=_cpu_times, sleep=time.sleep):
    """Cores kept busy by the machine's processes over `window` seconds, or None where /proc/stat is unreadable."""
    try:
        busy0, total0, cpus = read()
        sleep(window)
        busy1, total1, _ = read()
    except (OSError, ValueError, IndexError):
        return None, None
    if total1 <= total0:
        return None, None
    return (busy1 - busy0) / (total1 - total0) * cpus, cpus


def usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity mask on macOS and Windows
        return os.cpu_count() or 1


def pick_cpu_threads(measure=None):
    """Set torch's CPU threads to the cores that are free now (at least one). Returns (threads, cores, busy), or
    None where nothing was changed: OMP_NUM_THREADS is set, or the machine's load cannot be told apart from this
    process's cores (a container that sees the host's CPUs)."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = usable_cores()
    busy, cpus = (measure or busy_cores)()
    if busy is None or cpus != cores:
        return None
    threads = max(1, min(cores, round(cores - busy)))
    torch.set_num_threads(threads)
    return threads, cores, busy
