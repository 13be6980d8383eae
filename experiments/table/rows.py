"""The table's rows: their keys, the work folder that keeps every finished row (resumable), and the rows file that a
table keeps beside it (`--rows_file`)."""

import hashlib
import json
import os

import numpy as np
import torch

import solvers
from dnnlib.util import atomic_path, write_atomic
from torch_utils.cli import CommandError
from training.sfd_loss import SFDV_NUM_STEPS

# Row keys in table order; `--rows` takes a comma-separated subset.
ROW_KEYS = ("ref", "ddim10", "ddim50", "dpmpp5", "dpmpp10", "sfd2", "sfd3", "sfd4", "sfd5", "sfdv", "stage2")
DISTILLED = ("sfd2", "sfd3", "sfd4", "sfd5", "sfdv", "stage2")
# SFD-v's one model, sampled (with AFS) at every num_steps it was trained for.
SFDV_NFES = tuple(solvers.nfe_of("euler", n, afs=True) for n in range(SFDV_NUM_STEPS[0], SFDV_NUM_STEPS[1] + 1))
CURVE_KEY = "sfd2"
# SFD-v's curve: its one model scored at its hardest NFE, where it stands furthest from SFD.
CURVE_V_KEY, CURVE_V_NFE = "curve_v", SFDV_NFES[0]
# The second stage's curve: its 1-NFE student along its run.
CURVE_2_KEY, CURVE_2_NFE = "curve_2", 1


def parse_rows(text):
    keys = [k.strip() for k in text.split(",") if k.strip()] if text else list(ROW_KEYS)
    unknown = [k for k in keys if k not in ROW_KEYS]
    if unknown:
        raise CommandError(f"--rows: unknown row {unknown[0]!r}; choose from {','.join(ROW_KEYS)}")
    return keys


def parse_row_kimg(text):
    """'sfd3=50,sfdv=100' -> {'sfd3': 50.0, 'sfdv': 100.0}."""
    budgets = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in DISTILLED:
            raise CommandError(f"--row_kimg: {key!r} is not a distilled row; choose from {','.join(DISTILLED)}")
        try:
            budgets[key] = float(value)
        except ValueError:
            raise CommandError(f"--row_kimg: {item!r} is not ROW=KIMG (e.g. sfd3=50)") from None
        if budgets[key] <= 0:
            raise CommandError(f"--row_kimg: {key} needs a positive budget, got {value}")
    return budgets


def row_budgets(kimg, kimg_v, kimg2, row_kimg):
    """{distilled row: its kimg budget}: `--kimg` for the SFD rows, `--kimg_v`, `--kimg2`, then `--row_kimg`."""
    budgets = {k: kimg for k in ("sfd2", "sfd3", "sfd4", "sfd5")}
    budgets.update(sfdv=kimg_v, stage2=kimg2)
    budgets.update(parse_row_kimg(row_kimg))
    return budgets


def file_id(path):
    """A file's name, size and the start of its SHA-256. Name and size alone would let two teachers pass for each
    other: every snapshot of one network has the same size, and a retrained fmnist-teacher.pkl keeps its name."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"{os.path.basename(path)}:{os.path.getsize(path)}:{digest.hexdigest()[:12]}"


def changed_setting(theirs, settings):
    """The first setting (by name) in which two runs' settings differ, or None."""
    changed = sorted(k for k in set(theirs) | set(settings) if theirs.get(k) != settings.get(k))
    return changed[0] if changed else None


def read_rows_file(path, settings):
    """The rows of a rows file written beside another run's table, refused when they were made with other settings."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        theirs, rows = data["settings"], data["rows"]
        for row in rows:
            row_id(row)
    except FileNotFoundError:
        raise CommandError(f"--rows_file: no file {path}; pass the <table>-rows.json an earlier run wrote")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CommandError(f"--rows_file: {path} is not a rows file ({type(e).__name__}: {e}); pass the "
                           "<table>-rows.json an earlier run wrote")
    k = changed_setting(theirs, settings)
    if k is not None:
        raise CommandError(f"--rows_file: {path} holds rows made with {k}={theirs.get(k)!r}, not "
                           f"{settings.get(k)!r}; merge only rows made with the same settings")
    return rows


def row_id(row):
    """A row is its method and NFE, the budget of its distillation and, for a stopped model or a curve point, the kimg
    reached and the run (two runs of one budget, one started again from scratch, stay apart)."""
    at = row.get("kimg")
    return (row["key"], row["nfe"], row.get("budget_kimg"), at, row.get("run") if at is not None else None,
            row.get("from_kimg"))


def trained_rank(row):
    """How far a table row's model trained (a finished run's budget, a stopped one's kimg); the finished one first
    where a stopped run has reached as far."""
    trained = row.get("kimg") if row.get("kimg") is not None else (row.get("budget_kimg") or 0)
    return trained, row.get("kimg") is None


def table_slot(row):
    """Where a row stands in the table: its key's place, its NFE, the SFD-v model a second stage started from."""
    return ROW_KEYS.index(row["key"]), row["nfe"], row.get("from_kimg") or 0


class WorkFolder:
    """The resumable state of one table run: settings, endpoint images, finished rows, distillations."""

    def __init__(self, path, settings):
        self.path = path
        os.makedirs(path, exist_ok=True)
        settings_file = os.path.join(path, "settings.json")
        if os.path.exists(settings_file):
            with open(settings_file) as f:
                old = json.load(f)
            k = changed_setting(old, settings)
            if k is not None:
                raise CommandError(f"--workdir: {path} holds a run with {k}={old.get(k)!r}, not {settings.get(k)!r}; "
                                   "rerun with the same settings to resume it, or pass a new --workdir")
        else:
            write_atomic(settings_file, json.dumps(settings, indent=2) + "\n")
        self.rows_file = os.path.join(path, "rows.jsonl")
        self.rows = {}
        self.reload_rows()

    def has(self, key, nfe, budget=None, kimg=None, run=None, from_kimg=None):
        return (key, nfe, budget, kimg, run if kimg is not None else None, from_kimg) in self.rows

    def reload_rows(self):
        """Rows in rows.jsonl (also those another process appended to the same folder since)."""
        if os.path.exists(self.rows_file):
            for line in open(self.rows_file):
                if line.strip():
                    row = json.loads(line)
                    self.rows.setdefault(row_id(row), row)

    def merge_rows(self, rows):
        """Count rows read from a rows file (`read_rows_file`) as finished here; this folder's own rows win where
        both hold the same row."""
        for row in rows:
            self.rows.setdefault(row_id(row), row)

    def add_row(self, row):
        self.rows[row_id(row)] = row
        with open(self.rows_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    def run_dir(self, key, kimg, from_kimg=None):
        """A distillation's folder; a second stage started from an SFD-v snapshot (`--stage2_from`) names it."""
        suffix = f"-from-sfdv{from_kimg}kimg" if from_kimg is not None else ""
        return os.path.join(self.path, "distil", f"{key}-{kimg:g}kimg{suffix}")

    def endpoint(self, make):
        """uint8 endpoint images, computed once (`make()`) and kept as reference.npy."""
        path = os.path.join(self.path, "reference.npy")
        if os.path.exists(path):
            return torch.from_numpy(np.load(path))
        images = make()
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, images.numpy())
        return images

    def table_rows(self):
        """One row per (key, NFE) in table order, and per SFD-v model a second stage started from: the model trained
        longest (`trained_rank`)."""
        best = {}
        for r in self.rows.values():
            if r["key"] in ROW_KEYS:
                held = best.get(table_slot(r))
                if held is None or trained_rank(r) > trained_rank(held):
                    best[table_slot(r)] = r
        return [best[k] for k in sorted(best)]

    def curve_rows(self, key="curve"):
        """The points of a distillation curve ("curve": SFD-2's, CURVE_V_KEY: SFD-v's), by budget and kimg."""
        return sorted((r for r in self.rows.values() if r["key"] == key),
                      key=lambda r: (r.get("budget_kimg") or 0, r.get("run") or "", r["kimg"]))


def rows_file_path(out):
    """Every row behind a table, kept beside it so that the table and its plots can be rebuilt (`--rows_file`)
    without the work folder, and merged with other runs' rows."""
    return os.path.splitext(out)[0] + "-rows.json"


def write_rows_file(out, work, settings):
    order = {k: i for i, k in enumerate(ROW_KEYS + ("curve", CURVE_V_KEY, CURVE_2_KEY))}
    rows = sorted(work.rows.values(), key=lambda r: (order.get(r["key"], len(order)), r["key"], r["nfe"],
                                                    r.get("budget_kimg") or 0, r.get("kimg") or 0))
    lines = ",\n".join("  " + json.dumps(r) for r in rows)
    text = f'{{"settings": {json.dumps(settings)},\n "rows": [\n{lines}\n]}}\n'
    write_atomic(rows_file_path(out), text)
