"""The README's performance table from one `benchmarks/run_gpu.sh` call: ours beside the paper's code, as ratios.

Reads OUT/bench.jsonl (our benchmark lines carry "bench", the paper-code timer's carry "what") and OUT/pytest-gpu.xml
from the same call, so every ratio compares figures taken on the same card in the same call. Prints Markdown: the
card, torch version, date and command; a table of each figure of ours beside the paper code's with the ratio and
the target (TARGETS below); the steps that failed or were skipped; and the profile of one training iteration in each
setting. `--readme FILE` also replaces the text between the GPU report markers in FILE.

Examples:

\b
python benchmarks/report.py bench-out
python benchmarks/report.py bench-out --out bench-out/report.md --readme README.md
"""

import json
import os
import re
import sys
import xml.etree.ElementTree as ET

import click

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch_utils.cli import CommandError, run  # noqa: E402

# The targets of the GPU call (issue 47), all against the paper's code on the same card in the same call.
TARGETS = dict(
    train_speedup=2.4,        # training s/kimg: paper ÷ ours, fast path
    train_memory=1.0,         # peak memory: ours ÷ paper, fast path (at most)
    sample_fp32_speedup=1.0,  # NFE-2 img/s: ours ÷ paper, default fp32 path
    sample_fast_speedup=2.5,  # NFE-2 img/s: ours ÷ paper, fast path
    loss_rel_diff=0.01,       # fast path's per-step losses against fp32 over the first 2 kimg (max, at most)
    psnr_db=35.0,             # fast path's sampled images against fp32 (at least)
)
BEGIN, END = "<!-- gpu-report:begin -->", "<!-- gpu-report:end -->"


def read_lines(out_dir):
    path = os.path.join(out_dir, "bench.jsonl")
    if not os.path.isfile(path):
        raise CommandError(f"{out_dir} has no bench.jsonl: give the OUT folder of a benchmarks/run_gpu.sh call")
    lines = []
    with open(path) as f:
        for number, text in enumerate(f, 1):
            if text.strip():
                try:
                    lines.append(json.loads(text))
                except json.JSONDecodeError:
                    raise CommandError(f"{path}:{number} is not a JSON line") from None
    return lines


def pytest_counts(out_dir):
    path = os.path.join(out_dir, "pytest-gpu.xml")
    if not os.path.isfile(path):
        return None
    suites = ET.parse(path).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites)
    counts = dict(tests=0, failures=0, errors=0, skipped=0)
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def pick(lines, **match):
    """The last line whose keys (dotted for nested) equal the given values."""
    def value(line, dotted):
        for part in dotted.split("__"):
            line = line.get(part) if isinstance(line, dict) else None
        return line

    found = [line for line in lines if all(value(line, k) == v for k, v in match.items())]
    return found[-1] if found else None


def fmt(value, digits=3):
    return "—" if value is None else f"{value:.{digits}g}"


def verdict(ok):
    return "—" if ok is None else ("**yes**" if ok else "**no**")


def build(lines, pytest, out_dir=None):
    call = pick(lines, bench="call") or {}
    paper_train, paper_sample = pick(lines, what="paper_train"), pick(lines, what="paper_sample_nfe2")
    train = {fast: pick(lines, bench="train", settings__fast=fast) for fast in (False, True)}
    sample = {fast: pick(lines, bench="sample", settings__fast=fast) for fast in (False, True)}
    equiv, fid, ddp = pick(lines, bench="equivalence"), pick(lines, bench="fid"), pick(lines, bench="torchrun")
    env = next((line["env"] for line in (train[False], train[True], sample[False], fid) if line), {})

    rows = []

    def row(what, paper, ours, ratio_text, target_text, ok):
        rows.append(f"| {what} | {paper} | {ours} | {ratio_text} | {target_text} | {verdict(ok)} |")

    p_skimg = paper_train and paper_train.get("s_per_kimg")
    p_mem = paper_train and paper_train.get("peak_mem_gb")
    for fast in (False, True):
        t = train[fast]
        name = "fast path (" + ", ".join(f"{k}={v}" for k, v in _fast_opts(t).items()) + ")" if fast else \
            "paper setting (fp16)"
        speedup = p_skimg / t["s_per_kimg"] if t and p_skimg else None
        target = TARGETS["train_speedup"] if fast else None
        row(f"training s/kimg, batch {_batch(t, paper_train)}, {name}", fmt(p_skimg), fmt(t and t["s_per_kimg"]),
            f"{speedup:.2f}× faster" if speedup else "—", f"≥ {target}×" if target else "—",
            speedup >= target if speedup and target else None)
        mem = t["peak_mem_gb"] / p_mem if t and p_mem else None
        limit = TARGETS["train_memory"] if fast else None
        row(f"training peak memory GB, {name}", fmt(p_mem), fmt(t and t["peak_mem_gb"]),
            f"{mem:.2f}× the paper's" if mem else "—", f"≤ {limit}×" if limit else "—",
            mem <= limit if mem and limit else None)
    p_img = paper_sample and paper_sample.get("img_per_s_incl_latents")
    for fast in (False, True):
        s = sample[fast]
        key = "sample_fast_speedup" if fast else "sample_fp32_speedup"
        name = "fast path (" + ", ".join(f"{k}={v}" for k, v in _fast_opts(s).items()) + ")" if fast else "fp32"
        ours = s and s.get("img_per_s_png_off")
        ratio = ours / p_img if ours and p_img else None
        row(f"NFE-2 sampling img/s, batch {_batch(s, paper_sample)}, {name}, no PNG", fmt(p_img, 4), fmt(ours, 4),
            f"{ratio:.2f}×" if ratio else "—", f"≥ {TARGETS[key]}×", ratio >= TARGETS[key] if ratio else None)
        row(f"NFE-2 sampling img/s, batch {_batch(s, None)}, {name}, PNG written", "not timed", fmt(s and s.get("img_per_s_png_on"), 4),
            "—", "—", None)
    if equiv:
        fast = equiv["loss_rel_diff"].get("fast", {})
        paper16 = equiv["loss_rel_diff"].get("fp16", {})
        worst = fast.get("max")
        row(f"fast path per-step losses vs fp32, first {equiv['settings']['kimg']} kimg: max (median) relative "
            f"difference; the paper's fp16: {fmt(paper16.get('max'))} ({fmt(paper16.get('median'))})", "—",
            f"{fmt(worst)} ({fmt(fast.get('median'))})", "—", f"≤ {TARGETS['loss_rel_diff']:g}",
            worst <= TARGETS["loss_rel_diff"] if worst is not None else None)
        psnr = equiv["psnr_db"].get("fast_sampling")
        row(f"fast-path sampled images vs fp32, PSNR dB ({equiv['settings']['seeds']} seeds; students trained on "
            f"the fast path vs fp32: {fmt(equiv['psnr_db'].get('fast_trained'))} dB)", "—", fmt(psnr), "—",
            f"≥ {TARGETS['psnr_db']:g} dB", psnr >= TARGETS["psnr_db"] if psnr is not None else None)
    if fid:
        row(f"FID features img/s (Inception-v3, batch {_batch(fid, None)})", "not timed", fmt(fid.get("img_per_s"), 4), "—", "—", None)
    if ddp:
        row(f"torchrun --nproc_per_node={ddp['settings']['nproc']} train.py: process group, DDP, ranks in sync", "—",
            f"{ddp['backend']}, DDP {ddp['ddp']}, in sync {ddp['ranks_in_sync']}", "—", "runs", ddp.get("ok"))
    if pytest:
        row("pytest -m gpu", "—", f"{pytest['passed']} passed, {pytest['failures'] + pytest['errors']} failed, "
            f"{pytest['skipped']} skipped", "—", "all pass",
            pytest["failures"] + pytest["errors"] == 0 and pytest["passed"] > 0)

    card = env.get("device_name", "?")
    head = [f"Measured on {card} ({env.get('device', '?')}), torch {env.get('torch', '?')}"
            + (f", CUDA {env['cuda']}" if env.get("cuda") else "")
            + f", {call.get('date', 'date unknown')}, commit {call.get('commit', '?')}"
            + (" — a CPU dry run at tiny sizes: its figures say nothing about speed" if call.get("tiny") else ""),
            "", f"Command: `{call.get('command', '?')}` (one device call; the paper's code ran in the same call)", ""]
    if paper_train and env.get("device", "").startswith("cuda") and paper_train.get("gpu_name") != card:
        head += [f"**The paper's code ran on {paper_train.get('gpu_name')}, ours on {card}: no ratio holds.**", ""]
    table = ["| measurement | paper's code | ours | ours vs paper | target | met |", "|---|---|---|---|---|---|"] + rows
    steps = [line for line in lines if line.get("bench") == "step"]
    failed = [step for step in steps if str(step.get("rc")) != "0"]
    notes = [""] + ([f"Steps that did not finish: " + ", ".join(f"{s['name']} ({_rc_text(s)})" for s in failed)]
                    if failed else ["Every step finished."])
    profiles = []
    for fast in (False, True):
        prof = train[fast] and train[fast].get("profile")
        if prof:
            profiles += ["", f"Profile of one training iteration, {'fast path' if fast else 'paper setting'}:", "",
                         "```", prof["text"], "```"]
    commands = ["", "Steps and their commands:", ""] + [
        f"- {step['name']} ({step['seconds']} s, {_rc_text(step)}): `{_portable(step.get('command', ''), out_dir)}`"
        for step in steps]
    return "\n".join(head + table + notes + profiles + commands) + "\n"


def _fast_opts(line):
    if not line:
        return {}
    s = line["settings"]
    return {k: s[k] for k in ("precision", "channels_last", "compile") if k in s}


def _batch(line, paper_line):
    """The batch of our line (and the paper's where it differs)."""
    ours = line and line.get("settings", {}).get("batch")
    theirs = paper_line and paper_line.get("batch")
    return f"{ours} (paper: {theirs})" if theirs is not None and ours is not None and theirs != ours else (ours or theirs)


def _rc_text(step):
    rc = str(step["rc"])
    return {"0": "done", "124": f"stopped at its {step['cap_s']} s cap", "skipped": "budget spent",
            "missing": "no paper timer"}.get(rc, f"exit {rc}")


def _portable(command, out_dir):
    """A step's command with the call's output folder written as $OUT (no machine paths in the README)."""
    if out_dir:
        command = command.replace(os.path.abspath(out_dir), "$OUT")
    return command


def replace_section(path, text):
    with open(path) as f:
        doc = f.read()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(doc):
        raise CommandError(f"{path} has no {BEGIN} … {END} section to replace")
    with open(path, "w") as f:
        f.write(pattern.sub(lambda _: f"{BEGIN}\n{text}{END}", doc))


@click.command(help=__doc__)
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--out", "out_path", default=None, metavar="FILE", help="Also write the Markdown to FILE")
@click.option("--readme", default=None, metavar="FILE", help="Replace the GPU report section of FILE (the README)")
def main(out_dir, out_path, readme):
    if not os.path.isdir(out_dir):
        raise click.BadParameter(f"no such folder: {out_dir}", param_hint="OUT_DIR")
    if readme is not None and not os.path.isfile(readme):
        raise click.BadParameter(f"no such file: {readme}", param_hint="--readme")
    text = build(read_lines(out_dir), pytest_counts(out_dir), out_dir)
    print(text, end="")
    if out_path:
        with open(out_path, "w") as f:
            f.write(text)
    if readme:
        replace_section(readme, text)


if __name__ == "__main__":
    run(main)
