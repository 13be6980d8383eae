"""The table's Markdown report: every finished row in table order, the paper's orderings judged on those rows, the
SFD-2, SFD-v and second-stage distillation curves, and the hand-written notes kept beside the table."""

import math
import os

import solvers
from dnnlib.util import write_atomic

from .rows import CURVE_2_KEY, CURVE_2_NFE, CURVE_V_KEY, CURVE_V_NFE, SFDV_NFES

SFDV_TOLERANCE = 0.10  # the paper: one SFD-v model stays within 10 % of the SFD models trained per NFE


def format_minutes(seconds):
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.2f} h"


def write_table(out, work, settings):
    """Markdown table of every finished row in table order, the paper's orderings judged on those rows, then the
    SFD-2, SFD-v and second-stage curves (points of earlier runs included)."""
    rows = work.table_rows()
    machines = sorted({r.get("distill_machine") or r["machine"] for r in rows if r.get("distill_s") is not None})
    lines = [settings_line(settings, machines), "",
             "| method | NFE | teacher-FID | data-FID | PSNR (dB) | budget | distillation time |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        budget = budget_text(r)
        t = format_minutes(r["distill_s"]) if r.get("distill_s") is not None else ""
        if len(machines) > 1 and t:
            t += f" ({r.get('distill_machine') or r['machine']})"
        psnr = "(itself)" if r["key"] == "ref" else f"{r['psnr']:.2f}"
        lines.append(f"| {r['method']} | {r['nfe']} | {r['teacher_fid']:.2f} | {r['fid']:.2f} | {psnr} | {budget} "
                     f"| {t} |")
    if any(r.get("kimg") is not None for r in rows):
        lines += ["", "(stopped): an unfinished distillation scored at its latest training-state dump (`--partial`); "
                      "its lr drops ÷10 at half of the budget named."]
    lines += orderings_table(orderings(rows)) + curve_tables(work)
    notes = notes_path(out)
    if os.path.isfile(notes):
        with open(notes, encoding="utf-8") as f:
            lines += ["", f.read().strip()]
    write_atomic(out, "\n".join(lines) + "\n")
    print("\n".join(lines))


def settings_line(st, machines):
    """The paragraph over the table: teacher, samples, references, detector, endpoint, distillation recipe."""
    return (f"Fashion-MNIST 32×32 teacher `{st['teacher'].split(':')[0]}`, {st['num']} samples per row (seeds "
            f"0..{st['num'] - 1}). teacher-FID: against {st['teacher_ref'].split(':')[0]} (the teacher's converged "
            f"samples); data-FID: against the training set; both with `{st['detector'].split(':')[0]}`. PSNR: to "
            f"the Heun-{solvers.nfe_of('heun', st['reference_steps'])} endpoint from the same latents. "
            f"Distillation: batch {st['batch']}, lr {st['lr']:g} (second stage {st['lr2']:g}, from the SFD-v model, "
            f"M=2, LPIPS off), M=3 DPM-Solver++(3M) teacher, AFS, thresholding "
            f"{'on' if st['thresholding'] else 'off'}; distilled on: {'; '.join(machines) or '-'}.")


def orderings_table(judged):
    if not judged:
        return []
    within = 1 + SFDV_TOLERANCE
    lines = ["", f"The paper's orderings, judged on these rows. Beating a row: a lower teacher-FID, a higher "
                 f"PSNR. Within {SFDV_TOLERANCE:.0%} of SFD: a teacher-FID at most {within:g}× SFD's, and "
                 f"an RMSE to the endpoint at most {within:g}× SFD's (a PSNR at most "
                 f"{20 * math.log10(within):.2f} dB below it).", "",
             "| ordering | teacher-FID | PSNR (dB) |", "|---|---|---|"]
    return lines + [f"| {claim} | {fid} | {psnr} |" for claim, fid, psnr in judged]


def curve_tables(work):
    """The SFD-2, SFD-v and second-stage curves' tables, those that have points."""
    lines = []
    curve = work.curve_rows()
    if curve:
        lines += ["", "SFD-2 distillation curve (snapshots of the SFD-2 row's run; the lr drops ÷10 at half of it):",
                  "", "| kimg | teacher-FID | data-FID | PSNR (dB) | distillation time |", "|---|---|---|---|---|"]
        lines += [f"| {r['kimg']} | {r['teacher_fid']:.2f} | {r['fid']:.2f} | {r['psnr']:.2f} | "
                  f"{format_minutes(r['distill_s'])} |" for r in curve]
    curve_v = work.curve_rows(CURVE_V_KEY)
    if curve_v:
        lines += curve_table(curve_v, f"SFD-v distillation curve at {CURVE_V_NFE} NFE (its one model, trained at "
                                      f"{SFDV_NFES[0]}–{SFDV_NFES[-1]} NFE; the lr drops ÷10 at half of the budget, "
                                      f"{budgets_text(curve_v)} kimg; 'at {CURVE_V_NFE} NFE': the kimg of the "
                                      f"iterations that drew the {CURVE_V_NFE}-NFE student, a quarter on average):",
                             f"kimg at {CURVE_V_NFE} NFE", "nfe_kimg")
    curve_2 = sorted(work.curve_rows(CURVE_2_KEY), key=lambda r: r.get("from_kimg") or 0)  # by start, then as before
    if curve_2:
        lines += curve_table(curve_2, f"Second-stage distillation curve at {CURVE_2_NFE} NFE (from "
                                      f"{stage2_start(curve_2)}; "
                                      f"the lr drops ÷10 at half of the budget, {budgets_text(curve_2)} kimg; its "
                                      "time leaves out the SFD-v model's):", by_start=True)
    return lines


def budgets_text(curve):
    return " / ".join(f"{b:g}" for b in sorted({r["budget_kimg"] for r in curve}))


def budget_text(r, stopped=" (stopped)"):
    """A distilled row's budget: "200 kimg", or "55.3 of 200 kimg (stopped)" for a stopped run's dump."""
    budget = f"{r['budget_kimg']:g} kimg" if r.get("budget_kimg") else ""
    if budget and r.get("kimg") is not None:
        done = f"{r['kimg']:.3g}" if r["kimg"] < 1000 else f"{r['kimg']:.0f}"  # not "1.41e+03"
        budget = f"{done} of {budget}{stopped}"
    return budget


def verdict(ok):
    return "yes" if ok else "**no**"


def beats(r, base):
    """Cells of "r beats base": a lower teacher-FID, a higher PSNR."""
    fid_ok, psnr_ok = r["teacher_fid"] < base["teacher_fid"], r["psnr"] > base["psnr"]
    return (f"{r['teacher_fid']:.2f} vs {base['teacher_fid']:.2f}: {verdict(fid_ok)}",
            f"{r['psnr']:.2f} vs {base['psnr']:.2f}: {verdict(psnr_ok)}")


def close(r, sfd):
    """Cells of "r is within SFDV_TOLERANCE of sfd": its teacher-FID and its RMSE to the endpoint."""
    fid_ratio, rmse_ratio = r["teacher_fid"] / sfd["teacher_fid"], 10 ** ((sfd["psnr"] - r["psnr"]) / 20)
    return (f"{r['teacher_fid']:.2f} vs {sfd['teacher_fid']:.2f} ({fid_ratio - 1:+.0%}): "
            f"{verdict(fid_ratio <= 1 + SFDV_TOLERANCE)}",
            f"{r['psnr']:.2f} vs {sfd['psnr']:.2f} (RMSE {rmse_ratio - 1:+.0%}): "
            f"{verdict(rmse_ratio <= 1 + SFDV_TOLERANCE)}")


def named(name, r):
    return f"{name} ({budget_text(r, stopped='')})"


def orderings(rows):
    """The paper's orderings judged on table rows, as (claim, teacher-FID cell, PSNR cell): SFD-2 beats
    DPM-Solver++(3M)-5; SFD-v is within SFDV_TOLERANCE of SFD at each NFE both have; each second stage at 1 NFE
    beats DPM-Solver++(3M)-5. Each cell shows both values and whether the claim holds on that metric."""
    found = {(r["key"], r["nfe"]): r for r in rows if r["key"] != "stage2"}
    base, judged = found.get(("dpmpp5", 5)), []
    if base is not None and ("sfd2", 2) in found:
        sfd2 = found["sfd2", 2]
        judged.append((f"{named('SFD-2', sfd2)} beats DPM-Solver++(3M)-5", *beats(sfd2, base)))
    for nfe in SFDV_NFES:
        if ("sfdv", nfe) in found and (f"sfd{nfe}", nfe) in found:
            sfdv, sfd = found["sfdv", nfe], found[f"sfd{nfe}", nfe]
            judged.append((f"{named(f'SFD-v at {nfe} NFE', sfdv)} within {SFDV_TOLERANCE:.0%} of "
                           f"{named(f'SFD-{nfe}', sfd)}", *close(sfdv, sfd)))
    for r in rows:
        if r["key"] == "stage2" and base is not None:
            judged.append((f"{named(f'Second stage from {stage2_start([r])}', r)} at {r['nfe']} NFE beats "
                           "DPM-Solver++(3M)-5", *beats(r, base)))
    return judged


def curve_table(curve, title, extra_header=None, extra_key=None, by_start=False):
    """Markdown lines of a curve's points; each kimg names its budget once the points span several, what its run
    started from (`by_start`: a second stage's) once they start from several, and its run once several share a
    start."""
    starts = {stage2_start([r]) if by_start else "" for r in curve}
    runs = {(stage2_start([r]) if by_start else "", r.get("run") or "") for r in curve}
    several = (len({r["budget_kimg"] for r in curve}) > 1, len(starts) > 1, len(runs) > len(starts))
    extra = [extra_header] if extra_header else []
    lines = ["", title, "", "| " + " | ".join(["kimg"] + extra + ["teacher-FID", "data-FID", "PSNR (dB)",
                                                                   "distillation time"]) + " |",
             "|" + "---|" * (5 + len(extra))]
    for r in curve:
        cells = [point_name(r, by_start, *several)] + ([f"{r[extra_key]:.1f}"] if extra_key else [])
        cells += [f"{r['teacher_fid']:.2f}", f"{r['fid']:.2f}", f"{r['psnr']:.2f}", format_minutes(r["distill_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def point_name(r, by_start, budgets, starts, runs):
    """A curve point's kimg cell, naming its budget, start and run where its curve has several of those."""
    return (f"{r['kimg']:.1f}" + (f" of {r['budget_kimg']:g}" if budgets else "")
            + (f" from {stage2_start([r]) if by_start else ''}" if starts else "")
            + (f" (run {r.get('run') or '-'})" if runs else ""))


def stage2_start(rows):
    """What second-stage rows started from: the finished SFD-v model, or its snapshots (`--stage2_from`)."""
    starts = sorted({r.get("from_kimg") or 0 for r in rows})
    return " / ".join(f"SFD-v's {k}-kimg snapshot" if k else "the finished SFD-v model" for k in starts)


def notes_path(out):
    """Hand-written notes kept beside the table and appended to it, so regenerating the table keeps them."""
    return os.path.splitext(out)[0] + "-notes.md"
