"""The table script runs end to end on the built-in teacher (tiny sizes) and fills every row."""

import json

from click.testing import CliRunner

from experiments import fmnist_table


def test_table_script_fills_every_row(tmp_path):
    out = tmp_path / "table.md"
    r = CliRunner().invoke(fmnist_table.main, ["--num", "6", "--kimg", "0.004", "--batch", "4", "--sample_batch", "6",
                                               "--reference_steps", "3", "--workdir", str(tmp_path / "work"),
                                               "--out", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in open(tmp_path / "work" / "rows.jsonl")]
    methods = [(row["method"], row["nfe"]) for row in rows]
    assert methods == [("Teacher, Heun (reference)", 4), ("DDIM (Euler)", 10), ("DDIM (Euler)", 50),
                       ("DPM-Solver++(3M)", 5), ("DPM-Solver++(3M)", 10)] + [("SFD", n) for n in (2, 3, 4, 5)] + [
                          ("SFD-v (one model)", n) for n in (2, 3, 4, 5)] + [("SFD second stage", 1)]
    assert rows[0]["psnr"] > 90  # the reference against itself
    assert all(row["fid"] > 0 and row["psnr"] > 0 for row in rows)
    assert all(row["distill_s"] > 0 for row in rows if row["method"].startswith("SFD"))
    table = out.read_text()
    assert table.count("\n| ") == 15 and "| SFD second stage | 1 |" in table
