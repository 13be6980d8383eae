"""The table's plots (matplotlib, optional): quality against NFE per method, the SFD-2 and SFD-v distillation curves
at 2 NFE, and the second stage's at 1 NFE, with DPM-Solver++(3M)-5 as the line to beat."""

from dnnlib.util import atomic_path

from .report import format_minutes, stage2_start
from .rows import CURVE_2_KEY, CURVE_2_NFE, CURVE_V_KEY, CURVE_V_NFE


def plotted_curve(points):
    """The points of a curve that its plot shows: those of the largest budget, from the run that got furthest."""
    points = [r for r in points if r["budget_kimg"] == max((x["budget_kimg"] for x in points), default=None)]
    furthest = max(points, key=lambda r: r["kimg"], default={}).get("run")
    return [r for r in points if r.get("run") == furthest]


def stage2_curves(work):
    """The second stage's plotted curves, one per SFD-v model the stage started from (`--stage2_from`), by start:
    [(what it started from, its points)]."""
    starts = {}
    for r in work.curve_rows(CURVE_2_KEY):
        starts.setdefault(r.get("from_kimg") or 0, []).append(r)
    return [(stage2_start(points), plotted_curve(points)) for _, points in sorted(starts.items())]


def save_figure(plt, fig, axes, path):
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def write_plots(prefix, work):
    """<prefix>-nfe.png (quality vs NFE per method), <prefix>-curve.png (the SFD-2 and SFD-v distillation curves at
    2 NFE) and <prefix>-curve2.png (the second stage's at 1 NFE)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots written (pip install matplotlib)", flush=True)
        return []
    rows = work.table_rows()
    written = [nfe_figure(plt, rows, f"{prefix}-nfe.png")]
    curve, curve_v = work.curve_rows(), plotted_curve(work.curve_rows(CURVE_V_KEY))
    if curve or curve_v:
        written.append(curve_figure(plt, curve, curve_v, rows, f"{prefix}-curve.png"))
    curves_2 = stage2_curves(work)
    if curves_2:
        written.append(stage2_figure(plt, curves_2, rows, f"{prefix}-curve2.png"))
    for path in written:
        print(f"wrote {path}", flush=True)
    return written


def nfe_figure(plt, rows, path):
    """Teacher-FID and PSNR against NFE, a line per method (the endpoint row left out)."""
    import matplotlib.ticker

    methods = {}
    for r in rows:
        if r["key"] != "ref":
            methods.setdefault(r["method"], []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, rs in methods.items():
        rs = sorted(rs, key=lambda r: r["nfe"])
        nfe = [r["nfe"] for r in rs]
        style = "o-" if len(rs) > 1 else "*"
        axes[0].plot(nfe, [r["teacher_fid"] for r in rs], style, label=name, markersize=8)
        axes[1].plot(nfe, [r["psnr"] for r in rs], style, label=name, markersize=8)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("teacher-FID (lower is better)")
    axes[1].set_ylabel("PSNR to the converged endpoint (dB)")
    nfes = sorted({r["nfe"] for rs in methods.values() for r in rs})
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(nfes, [str(n) for n in nfes])  # plain NFE labels, not 2×10⁰
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("NFE")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
    axes[0].yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axes[0].yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    return save_figure(plt, fig, axes, path)


def curve_figure(plt, curve, curve_v, rows, path):
    """SFD-2's curve and SFD-v's at CURVE_V_NFE (against all its kimg, and against the kimg spent at that NFE)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    if curve:
        kimg = [r["kimg"] for r in curve]
        axes[0].plot(kimg, [r["teacher_fid"] for r in curve], "o-", label="SFD, 2 NFE")
        axes[1].plot(kimg, [r["psnr"] for r in curve], "o-", label="SFD, 2 NFE")
        fig.suptitle(f"SFD-2 distillation: {curve[-1]['distill_s'] / 60:.0f} min for {kimg[-1]} kimg on "
                     f"{curve[-1]['machine']}", fontsize=10)
    for x, style, axis in (("kimg", "s-", "all kimg"), ("nfe_kimg", "s:", f"its {CURVE_V_NFE}-NFE kimg")):
        if curve_v:
            kv, label = [r[x] for r in curve_v], f"SFD-v, {CURVE_V_NFE} NFE (x: {axis})"
            axes[0].plot(kv, [r["teacher_fid"] for r in curve_v], style, color="C2", label=label)
            axes[1].plot(kv, [r["psnr"] for r in curve_v], style, color="C2", label=label)
    return finish_curve_figure(plt, fig, axes, rows, path)


def stage2_figure(plt, curves_2, rows, path):
    """The second stage's curves at CURVE_2_NFE, a line per SFD-v model it started from."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, (start, points) in enumerate(curves_2):
        kimg, last = [r["kimg"] for r in points], points[-1]
        label = f"from {start}: {format_minutes(last['distill_s'])} for {last['kimg']:.0f} kimg"
        for ax, metric in zip(axes, ("teacher_fid", "psnr")):
            ax.plot(kimg, [r[metric] for r in points], "^-", color=f"C{4 + i}", label=label)
    fig.suptitle(f"SFD second stage at {CURVE_2_NFE} NFE on {curves_2[-1][1][-1]['machine']}", fontsize=10)
    return finish_curve_figure(plt, fig, axes, rows, path)


def finish_curve_figure(plt, fig, axes, rows, path):
    """A distillation curve's axes (teacher-FID, PSNR against kimg) with DPM-Solver++(3M)-5 as the line to beat."""
    import matplotlib.ticker

    base = [r for r in rows if r["key"] == "dpmpp5"]
    if base:
        axes[0].axhline(base[0]["teacher_fid"], color="gray", linestyle="--", label="DPM-Solver++(3M), 5 NFE")
        axes[1].axhline(base[0]["psnr"], color="gray", linestyle="--", label="DPM-Solver++(3M), 5 NFE")
    axes[0].set_yscale("log")
    axes[0].yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axes[0].yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axes[0].set_ylabel("teacher-FID")
    axes[1].set_ylabel("PSNR (dB)")
    for ax in axes:
        ax.set_xlabel("distillation kimg")
        ax.grid(True, alpha=0.3)
    return save_figure(plt, fig, axes, path)
