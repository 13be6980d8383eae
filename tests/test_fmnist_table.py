"""The table script runs end to end on the built-in teacher (tiny sizes), fills every row, and resumes."""

import json

from click.testing import CliRunner

from experiments import fmnist_table

TINY = ["--num", "6", "--kimg", "0.004", "--batch", "4", "--sample_batch", "6", "--reference_steps", "3",
        "--device", "cpu"]


def read_rows(work):
    return [json.loads(line) for line in open(work / "rows.jsonl")]


def test_table_script_fills_every_row_and_resumes(tmp_path):
    out, work = tmp_path / "table.md", tmp_path / "work"
    args = TINY + ["--workdir", str(work), "--out", str(out)]
    r = CliRunner().invoke(fmnist_table.main, args)
    assert r.exit_code == 0, r.output
    rows = read_rows(work)
    methods = [(row["method"], row["nfe"]) for row in rows]
    assert methods == [("Teacher, Heun (reference)", 4), ("DDIM (Euler)", 10), ("DDIM (Euler)", 50),
                       ("DPM-Solver++(3M)", 5), ("DPM-Solver++(3M)", 10)] + [("SFD", n) for n in (2, 3, 4, 5)] + [
                          ("SFD-v (one model)", n) for n in (2, 3, 4, 5)] + [("SFD second stage", 1)]
    assert rows[0]["psnr"] > 90  # the reference against itself
    assert all(row["fid"] > 0 and row["psnr"] > 0 for row in rows)
    assert all(row["distill_s"] > 0 for row in rows if row["method"].startswith("SFD"))
    table = out.read_text()
    assert table.count("\n| ") == 15 and "| SFD second stage | 1 |" in table

    # The same command again finds every row done: nothing is recomputed, nothing distilled again.
    runs = sorted(p.name for p in work.iterdir() if p.name.startswith("run-"))
    r = CliRunner().invoke(fmnist_table.main, args)
    assert r.exit_code == 0, r.output
    assert read_rows(work) == rows
    assert sorted(p.name for p in work.iterdir() if p.name.startswith("run-")) == runs
    assert out.read_text() == table
    out.unlink()
    r = CliRunner().invoke(fmnist_table.main, args + ["--table_only"])
    assert r.exit_code == 0 and out.read_text() == table and read_rows(work) == rows

    # Other settings in the same folder are refused with a one-line error naming the option.
    r = CliRunner().invoke(fmnist_table.main, args[:1] + ["7"] + args[2:])
    assert r.exit_code == 2 and "--workdir" in r.output and "num=6" in r.output


def test_table_rows_subset_then_the_rest(tmp_path):
    work, out = tmp_path / "work", tmp_path / "t.md"
    args = TINY + ["--workdir", str(work), "--out", str(out)]
    r = CliRunner().invoke(fmnist_table.main, args + ["--rows", "ddim10,dpmpp5"])
    assert r.exit_code == 0, r.output
    assert [row["key"] for row in read_rows(work)] == ["ddim10", "dpmpp5"]
    assert (work / "reference.npy").exists()  # PSNR needs the endpoint even when its row is not asked for
    first = read_rows(work)
    r = CliRunner().invoke(fmnist_table.main, args + ["--rows", "ref,sfd2,ddim10"])
    assert r.exit_code == 0, r.output
    rows = read_rows(work)
    assert rows[:2] == first and [row["key"] for row in rows[2:]] == ["ref", "sfd2"]
    lines = [ln for ln in out.read_text().splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert [ln.split(" | ")[0] for ln in lines] == ["| Teacher, Heun (reference)", "| DDIM (Euler)",
                                                     "| DPM-Solver++(3M)", "| SFD"]


def test_table_unknown_row_is_a_clear_error(tmp_path):
    r = CliRunner().invoke(fmnist_table.main, TINY + ["--workdir", str(tmp_path / "w"), "--rows", "sfd7"])
    assert r.exit_code == 2 and "--rows" in r.output and "sfd7" in r.output


def test_budget_script_scores_snapshots_against_a_table_run(tmp_path):
    from experiments import fmnist_sfd_budget

    work = tmp_path / "work"
    r = CliRunner().invoke(fmnist_table.main, TINY + ["--workdir", str(work), "--out", str(tmp_path / "t.md"),
                                                      "--rows", "ref"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "budget.jsonl"
    r = CliRunner().invoke(fmnist_sfd_budget.main, ["--table_workdir", str(work), "--kimg", "0.008", "--every", "1",
                                                    "--num", "6", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in open(out)]
    assert [row["method"] for row in rows] == ["DPM-Solver++(3M)", "SFD"]
    assert all(row["fid"] > 0 and 0 < row["psnr"] < 100 for row in rows) and rows[1]["kimg"] == 0
    r = CliRunner().invoke(fmnist_sfd_budget.main, ["--table_workdir", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "--table_workdir" in r.output
