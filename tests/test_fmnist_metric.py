"""The benchmark's measurement scripts on a tiny teacher: the solver-ladder sanity check (and the teacher reference
statistics it writes), the teacher snapshot curve, and the quickstart report."""

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from experiments import fmnist_metric, fmnist_table, fmnist_teacher_curve, quickstart_report
from tests.conftest import ROOT, build_tiny_edm, write_edm_pickle

DETECTOR = os.path.join(ROOT, "assets", "fmnist-detector.pt")
DATA_REF = os.path.join(ROOT, "assets", "fmnist-train-ref.npz")


@pytest.mark.slow
def test_metric_ladder_report_and_reference(tmp_path, tiny_teacher_pkl):
    out, ref = tmp_path / "m.md", tmp_path / "teacher-ref.npz"
    args = ["--teacher", tiny_teacher_pkl[0], "--detectors", DETECTOR, "--num", "3", "--ref_num", "4",
            "--sample_batch", "4", "--workdir", str(tmp_path / "w"), "--write_ref", str(ref), "--out", str(out),
            "--device", "cpu"]
    r = CliRunner().invoke(fmnist_metric.main, args)
    assert r.exit_code == 0, r.output
    report = json.load(open(tmp_path / "m.json"))
    (entry,) = report["detectors"]
    rows = [(row["set"], row["ladder"], row["nfe"]) for row in entry["rows"]]
    assert rows == [(s, name, nfe) for s in "AB" for name, (_, nfes) in fmnist_metric.LADDERS.items() for nfe in nfes]
    assert all(row["teacher_fid"] > 0 and row["data_fid"] > 0 for row in entry["rows"])
    assert set(entry["monotone"]) == {"A:DPM-Solver++(3M)", "A:Heun", "B:DPM-Solver++(3M)", "B:Heun"}
    # Files of the repo are recorded relative to it: a committed report names no machine path.
    assert (entry["detector"], entry["data_ref"]) == ("assets/fmnist-detector.pt", "assets/fmnist-train-ref.npz")
    stats = np.load(ref)
    assert stats["mu"].shape == (128,) and stats["sigma"].shape == (128, 128)
    # The reference holds the 4 Heun-34 images of seeds 100000..100003, and set B is not set A.
    cache = tmp_path / "w" / fmnist_table.file_id(tiny_teacher_pkl[0]).replace(":", "-")
    ref_images = np.load(cache / "heun34" / "seeds100000-100003.npy")
    assert ref_images.shape == (4, 1, 8, 8)
    mu, sigma = fmnist_metric.stats_of(fmnist_metric.load_detector(DETECTOR), ref_images, torch.device("cpu"))
    np.testing.assert_allclose(stats["mu"], mu, rtol=1e-6)
    np.testing.assert_allclose(stats["sigma"], sigma, rtol=1e-6, atol=1e-12)
    a, b = np.load(cache / "dpmpp5" / "seeds0-2.npy"), np.load(cache / "dpmpp5" / "seeds50000-50002.npy")
    assert not np.array_equal(a, b)
    assert "NOT monotone" in out.read_text() or "monotone" in out.read_text()

    # A rerun samples nothing again: every image set comes from the cache.
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("*.npy")}
    r = CliRunner().invoke(fmnist_metric.main, args)
    assert r.exit_code == 0, r.output
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.npy")} == stamps
    assert json.load(open(tmp_path / "m.json")) == report


def test_metric_is_monotone_is_strict():
    assert fmnist_metric.is_monotone([3.0, 2.0, 1.0])
    assert not fmnist_metric.is_monotone([3.0, 3.0, 1.0])
    assert not fmnist_metric.is_monotone([3.0, 1.0, 2.0])


def test_metric_bad_set_is_one_line_error(tmp_path, tiny_teacher_pkl):
    r = CliRunner().invoke(fmnist_metric.main, ["--teacher", tiny_teacher_pkl[0], "--sets", "A,C",
                                                "--workdir", str(tmp_path)])
    assert r.exit_code == 2 and "--sets" in r.output and "'C'" in r.output


def test_teacher_curve_scores_every_snapshot(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for kimg, seed in ((10, 0), (20, 1)):
        net = build_tiny_edm(seed=seed)
        with torch.no_grad():  # zero-initialised output layers would make every fresh network the same denoiser
            for p in net.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
        write_edm_pickle(run / f"network-snapshot-{kimg:06d}.pkl", net)
    out = tmp_path / "curve.md"
    r = CliRunner().invoke(fmnist_teacher_curve.main, ["--run", str(run), "--num", "3", "--detectors", DETECTOR,
                                                       "--workdir", str(tmp_path / "w"), "--out", str(out),
                                                       "--device", "cpu"])
    assert r.exit_code == 0, r.output
    rows = json.load(open(tmp_path / "curve.json"))["rows"]
    assert [row["kimg"] for row in rows] == [10, 20]
    assert rows[0]["fids"][0] != rows[1]["fids"][0] and all(row["fids"][0] > 0 for row in rows)
    assert "| 10 |" in out.read_text() and "| 20 |" in out.read_text()
    r = CliRunner().invoke(fmnist_teacher_curve.main, ["--run", str(tmp_path)])
    assert r.exit_code == 2 and "--run" in r.output


def test_quickstart_report_compares_student_and_solvers(tmp_path, tiny_teacher_pkl):
    import train

    pkl = tiny_teacher_pkl[0]
    r = CliRunner().invoke(train.main, ["--outdir", str(tmp_path), "--model_path", pkl, "--batch", "4",
                                        "--total_kimg", "0.008", "--seed", "1", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    r = CliRunner().invoke(quickstart_report.main, ["--student", str(run), "--teacher", pkl, "--teacher_ref",
                                                    DATA_REF, "--num", "4", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    table = [ln.rsplit(maxsplit=3) for ln in lines if ln.startswith("  ") and "teacher-FID" not in ln]
    assert [(name.strip(), int(nfe)) for name, nfe, _, _ in table] == [
        ("SFD student (distilled)", 2), ("teacher, Euler (AFS)", 2), ("teacher, DPM-Solver++(3M)", 2),
        ("teacher, DPM-Solver++(3M)", 5)]
    assert all(float(t) > 0 and float(f) > 0 for _, _, t, f in table)
    student, baseline = table[0], table[-1]
    verdict = "beats" if float(student[2]) < float(baseline[2]) else "does not yet beat"
    assert lines[-1].startswith("Result: after ") and f"2-NFE SFD student {verdict} DPM-Solver++(3M) at 5 NFE" in lines[-1]
    # quickstart.sh's settings (channels-last networks, batches of 3): the same table to its printed digits.
    r = CliRunner().invoke(quickstart_report.main, ["--student", str(run), "--teacher", pkl, "--teacher_ref",
                                                    DATA_REF, "--num", "4", "--device", "cpu", "--batch", "3",
                                                    "--channels_last", "True"])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[1:-1] == lines[1:-1]


@pytest.mark.parametrize("student_fid, verdict", [(1.0, "beats"), (3.0, "does not yet beat")])
def test_quickstart_sentence_states_the_comparison(student_fid, verdict):
    s = quickstart_report.sentence(dict(nfe=2, teacher_fid=student_fid, fid=10.0), dict(nfe=5, teacher_fid=2.0,
                                                                                        fid=9.0), 3.14)
    assert s == (f"Result: after 3.1 minutes of distillation, the 2-NFE SFD student {verdict} DPM-Solver++(3M) at "
                 f"5 NFE on teacher-FID ({student_fid:.2f} vs 2.00; data-FID 10.00 vs 9.00).")


def test_afs_export_cost_scores_the_student_with_and_without_its_first_step(tmp_path, tiny_teacher_pkl):
    import train
    from experiments import afs_export_cost

    r = CliRunner().invoke(train.main, ["--outdir", str(tmp_path), "--model_path", tiny_teacher_pkl[0], "--batch",
                                        "4", "--total_kimg", "0.004", "--seed", "1", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    r = CliRunner().invoke(afs_export_cost.main, ["--student", str(run), "--teacher_ref", DATA_REF, "--num", "4",
                                                  "--device", "cpu"])
    assert r.exit_code == 0, r.output
    rows = [ln.rsplit(maxsplit=3) for ln in r.output.splitlines()[2:]]
    assert [(name.strip(), int(nfe)) for name, nfe, _, _ in rows] == [("as distilled", 2),
                                                                       ("as exported (AFS off)", 3)]
    assert rows[0][2:] != rows[1][2:]  # another first step, other images
    r = CliRunner().invoke(afs_export_cost.main, ["--student", str(tmp_path / "none")])
    assert r.exit_code == 2 and "--student" in r.output
