"""train.py's experiment folders `NNNNN-{desc}` as sample.py finds them: the latest snapshot of a run, and where
the runs are when a run number is not found."""

import glob
import os
import re

import click


def latest_snapshot(exp_number, exps_dir="./exps"):
    """Latest `network-snapshot-*.safetensors` of the experiment folder `exps_dir/NNNNN-*`."""
    prefix = f"{int(exp_number):05d}-"
    if os.path.exists(exps_dir) and not os.path.isdir(exps_dir):
        raise click.BadParameter(f"{exps_dir} is a file, not a folder of experiments", param_hint="--exps_dir")
    folders = sorted(f for f in glob.glob(os.path.join(exps_dir, prefix + "*")) if os.path.isdir(f))
    if not folders:
        raise click.BadParameter(f"no experiment folder {exps_dir}/{prefix}*; {where_runs_are(exp_number, exps_dir)}",
                                 param_hint="--model_path")
    return latest_snapshot_in(folders[0])


def numbered_runs(folder):
    """The run numbers of the experiment folders `NNNNN-*` directly inside `folder` (train.py's layout)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return sorted({int(n[:5]) for n in names
                   if re.fullmatch(r"\d{5}-.+", n) and os.path.isdir(os.path.join(folder, n))})


def _run_list(numbers):
    if len(numbers) == 1:
        return f"run {numbers[0]:05d}"
    if numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"runs {numbers[0]:05d}..{numbers[-1]:05d}"
    shown = ", ".join(f"{n:05d}" for n in numbers[:4])
    return f"runs {shown}" + (", ..." if len(numbers) > 4 else "")


def where_runs_are(exp_number, exps_dir):
    """For the 'no experiment folder' error: which runs `exps_dir` holds, and which of its sub-folders hold
    numbered runs of their own (train.py --outdir=exps/NAME, as the quickstart does), with the --exps_dir to add."""
    if not os.path.isdir(exps_dir):
        return (f"{exps_dir} does not exist: add --exps_dir=DIR for the folder train.py wrote its runs to (its "
                f"--outdir), or give --model_path a snapshot file or an experiment folder")
    notes = []
    own = numbered_runs(exps_dir)
    if own:
        notes.append(f"{os.path.normpath(exps_dir)} holds {_run_list(own)}")
    elsewhere = []
    for name in sorted(os.listdir(exps_dir)):
        sub = os.path.join(exps_dir, name)
        runs = numbered_runs(sub) if os.path.isdir(sub) and not re.fullmatch(r"\d{5}-.+", name) else []
        if runs:
            elsewhere.append((int(exp_number) not in runs, os.path.normpath(sub), runs))
    for _, sub, runs in sorted(elsewhere)[:3]:  # the folders holding the asked-for number first
        notes.append(f"{sub} holds {_run_list(runs)}: add --exps_dir={sub}")
    if not elsewhere:
        notes.append("add --exps_dir=DIR for the folder train.py wrote its runs to (its --outdir)")
    return "; ".join(notes)


def latest_snapshot_in(folder):
    snapshots = glob.glob(os.path.join(folder, "network-snapshot-*.safetensors"))
    if not snapshots:
        raise click.BadParameter(f"{folder} holds no network snapshot yet", param_hint="--model_path")
    return max(snapshots, key=lambda p: int(re.search(r"network-snapshot-(\d+)", p).group(1)))
