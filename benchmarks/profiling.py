"""Where one training iteration spends its time: a short torch.profiler summary.

`IterationProfiler` starts torch.profiler at a chosen point of the real loop and stops it at another (bench_train.py
places them around one iteration after the timed ones). `summarize` turns the recorded events into what explains a
missed throughput target:

- the device kernels that take the most time (on a CPU: the operators with the most self time);
- the CPU time spent launching work (kernel launches, graph launches) and how many launches there were;
- host-device synchronisations: runtime calls that block the host (stream/device/event synchronise, a synchronous
  memcpy), and the operators that read a tensor's value on the host (`item`, `nonzero`, ...);
- wall time against device busy time, so an idle device (a launch-bound or sync-bound loop) shows as a number.
"""

import time

import torch

# CUDA runtime/driver calls as the profiler names them.
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch",
                "cudaLaunchCooperativeKernel")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "cuStreamSynchronize", "cuCtxSynchronize")
# Operators that read a tensor's value on the host: a sync when the tensor is on the GPU (Adam's step counters, for
# one, are host tensors, so their reads cost nothing).
SCALAR_READS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal")


class IterationProfiler:
    """start()/stop() around a region of the real loop (each at most once); `summary` is set after stop()."""

    def __init__(self, device, top=12):
        self.device = device
        self.top = top
        self.prof = None
        self.summary = None
        self._t0 = None

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self):
        if self.prof is not None:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._sync()
        self.prof = torch.profiler.profile(activities=activities)
        self.prof.start()
        self._t0 = time.perf_counter()

    @property
    def running(self):
        return self.prof is not None and self.summary is None

    def stop(self):
        if not self.running:
            return
        self._sync()
        wall = time.perf_counter() - self._t0
        self.prof.stop()
        self.summary = summarize(self.prof.key_averages(), wall, self.device, self.top)


def _ms(us):
    return round(us / 1000, 3)


def summarize(averages, wall_s, device, top=12):
    """A dict of the figures above from `profile.key_averages()`; its 'text' entry is the readable form."""
    rows = list(averages)
    kernels = sorted((e for e in rows if e.self_device_time_total > 0), key=lambda e: -e.self_device_time_total)
    device_us = sum(e.self_device_time_total for e in kernels)
    ops = sorted((e for e in rows if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total)
    launches = [e for e in rows if e.key in LAUNCH_CALLS]
    syncs = {e.key: e.count for e in rows if e.key in SYNC_CALLS}
    reads = {e.key: e.count for e in rows if e.key in SCALAR_READS}
    out = dict(
        device=str(device), wall_ms=round(wall_s * 1000, 3), device_busy_ms=_ms(device_us),
        device_idle_fraction=round(1 - device_us / 1e6 / wall_s, 4) if device.type == "cuda" and wall_s > 0 else None,
        cpu_ops_ms=_ms(sum(e.self_cpu_time_total for e in ops)),
        launches=sum(e.count for e in launches), launch_cpu_ms=_ms(sum(e.self_cpu_time_total for e in launches)),
        host_syncs=sum(syncs.values()), host_sync_calls=syncs, scalar_reads=reads,
        top_kernels=[dict(name=e.key[:120], calls=e.count, ms=_ms(e.self_device_time_total),
                          share=round(e.self_device_time_total / device_us, 4)) for e in kernels[:top]],
        top_cpu_ops=[dict(name=e.key, calls=e.count, self_cpu_ms=_ms(e.self_cpu_time_total)) for e in ops[:top]],
    )
    lines = [f"one iteration on {device}: wall {out['wall_ms']:.1f} ms, device busy {out['device_busy_ms']:.1f} ms"
             + (f" (idle {100 * out['device_idle_fraction']:.0f}%)" if out["device_idle_fraction"] is not None else ""),
             f"CPU: {out['cpu_ops_ms']:.1f} ms in aten operators; {out['launches']} launches costing "
             f"{out['launch_cpu_ms']:.1f} ms",
             f"host syncs: {out['host_syncs']} " + (str(syncs) if syncs else "")
             + (f"; scalar reads (a sync only on device tensors): {reads}" if reads else "")]
    if kernels:
        lines.append("top kernels (device time):")
        lines += [f"  {k['ms']:9.3f} ms {100 * k['share']:5.1f}% x{k['calls']:<5} {k['name']}" for k in out["top_kernels"]]
    lines.append("top operators (self CPU time):")
    lines += [f"  {o['self_cpu_ms']:9.3f} ms x{o['calls']:<5} {o['name']}" for o in out["top_cpu_ops"]]
    out["text"] = "\n".join(lines)
    return out
