"""The paper's Table 2 on the built-in Fashion-MNIST teacher, at the paper's budget, on whatever machine runs it.

Rows: DDIM/Euler at 10 and 50 NFE, DPM-Solver++(3M) at 5 and 10 NFE, SFD at 2/3/4/5 NFE (one model each), SFD-v
(one model) at 2..5 NFE, the second stage at 1 NFE. Columns, every one measured here:
- teacher-FID: FID against the teacher's own converged samples (`assets/fmnist-teacher-ref.npz`, 10k Heun-34
  samples on seeds disjoint from the evaluation seeds; `experiments/fmnist_metric.py` shows that it ranks solvers);
- data-FID: FID against the Fashion-MNIST training set;
- PSNR to the teacher's converged ODE endpoint (Heun) from the same latents;
- the distillation budget, its wall time and the machine.
Distillation follows `launch.sh` (the paper's CIFAR-10 recipes): SFD 200 kimg, SFD-v 800 kimg, both batch 128,
lr 5e-5, DPM-Solver++(3M) teacher with M=3 and AFS; second stage from the SFD-v model, 2000 kimg, lr 5e-4, M=2
(LPIPS off: offline). `--row_kimg sfd3=50,...` gives a row a smaller budget; the table states each row's.

SFD-2 also records its distillation curve: a snapshot every `--curve_every` ticks, each scored like a row. SFD-v
records one at 2 NFE, where it trails SFD most: a snapshot every `--curve_v_every` ticks (with `--partial`, the kept
dumps of a stopped run stand in for them), each scored with the kimg the run spent on that NFE's student length
(replayed from the run's seeded draw; a quarter of the whole on average), so that it compares with SFD-2's curve.
The second stage records its 1-NFE student every `--curve_2_every` ticks likewise (a point's time leaves out the
SFD-v model the stage starts from; its table row includes it). `--stage2_from K` starts the second stage from the
SFD-v run's snapshot at K kimg instead of its finished model, in a folder and a row of its own, where machine time
for the whole first stage is short.
`--plots` writes the quality-vs-NFE plot and the curves (needs matplotlib; without it only the table is written).
Under the table the script judges the paper's orderings on its rows, on teacher-FID and PSNR (`orderings`): SFD-2
and each second stage against DPM-Solver++(3M)-5, SFD-v within 10 % of SFD at each NFE.

    python experiments/fmnist_table.py --num 10000 --workdir exps/table --out experiments/fmnist_table.md --plots

Everything is resumable: the work folder keeps the settings, the endpoint images, every finished row, every
snapshot, and the training-state dumps of the distillations (every `--dump_every` ticks), so the same command after
a crash, a kill or the end of a session continues where it stopped. `--rows` restricts a run to some rows. A work
folder made with other settings is refused. `--partial` trains nothing and scores each unfinished distillation at its
latest dump (a row "K of B kimg (stopped)", replaced by the finished model's row once the run completes); dumps made on
another machine with the same settings can be copied into `<workdir>/distil/` for that.

Beside `--out` the script writes `<out stem>-rows.json`: every row of the work folder, with its settings. Commit it
with the table: `--rows_file` reads it back (rows made with other settings are refused), so that `--table_only`
rebuilds the table and plots without the work folder, and a new run adds only the rows it lacks. A stopped model's
row and a curve point name the run they come from (`run_id`), so a distillation started again from scratch after
its work folder was lost keeps its own points beside the merged ones of the lost run.

This script is the command; its parts are in `experiments/table/`: rows (the work folder and rows file), runs (the
distillations), scoring (making the rows), report (the table) and plots.
"""

import os
import sys

import click
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # run as a script from anywhere

from experiments.table.plots import write_plots  # noqa: E402
from experiments.table.report import write_table  # noqa: E402
from experiments.table.rows import ROW_KEYS, WorkFolder, file_id, parse_rows, read_rows_file  # noqa: E402
from experiments.table.rows import row_budgets, write_rows_file  # noqa: E402
from experiments.table.runs import Distillations  # noqa: E402
from experiments.table.scoring import FIRST_STAGE, RowMaker, Sampling  # noqa: E402
from torch_utils.cli import CommandError  # noqa: E402
from training.precision import full_fp32  # noqa: E402

ASSETS = os.path.join(REPO, "assets")


@click.command()
@click.option("--teacher", default=os.path.join(ASSETS, "fmnist-teacher.pkl"), show_default=True)
@click.option("--detector", default=os.path.join(ASSETS, "fmnist-detector.pt"), show_default=True)
@click.option("--ref", default=os.path.join(ASSETS, "fmnist-train-ref.npz"), show_default=True,
              help="Training-set statistics (data-FID)")
@click.option("--teacher_ref", default=os.path.join(ASSETS, "fmnist-teacher-ref.npz"), show_default=True,
              help="The teacher's converged-sample statistics (teacher-FID)")
@click.option("--num", help="Samples per row (seeds 0..num-1)", type=click.IntRange(min=2), default=10000,
              show_default=True)
@click.option("--kimg", help="Budget of each SFD row (launch.sh: 200)", type=click.FloatRange(min=0, min_open=True),
              default=200, show_default=True)
@click.option("--kimg_v", help="Budget of the SFD-v model (launch.sh: 800)", type=click.FloatRange(min=0, min_open=True),
              default=800, show_default=True)
@click.option("--kimg2", help="Budget of the second stage (launch.sh: 2000)",
              type=click.FloatRange(min=0, min_open=True), default=2000, show_default=True)
@click.option("--row_kimg", default=None,
              help="Other budgets for some rows, e.g. sfd3=50,sfdv=100 (each budget distils in its own folder; the "
                   "table shows the longest-trained model of a row)")
@click.option("--batch", help="Distillation batch (launch.sh: 128)", type=click.IntRange(min=1), default=128,
              show_default=True)
@click.option("--lr", help="First-stage learning rate (launch.sh: 5e-5)", type=float, default=5e-5, show_default=True)
@click.option("--lr2", help="Second-stage learning rate (launch.sh: 5e-4)", type=float, default=5e-4,
              show_default=True)
@click.option("--thresholding", type=bool, default=False, show_default=True,
              help="DPM-Solver++ dynamic thresholding in the baseline rows and the SFD teacher (train.py's default)")
@click.option("--sample_batch", type=click.IntRange(min=1), default=500, show_default=True)
@click.option("--reference_steps", help="Heun time points of the PSNR endpoint (NFE = 2(N-1))", type=int,
              default=18, show_default=True)
@click.option("--tick", help="Distillation tick in kimg (status line; the unit of the two options below)",
              type=click.FloatRange(min=0, min_open=True), default=1, show_default=True)
@click.option("--curve_every", help="SFD-2 snapshot (and curve point) interval in ticks", type=click.IntRange(min=1),
              default=10, show_default=True)
@click.option("--curve_v_every", type=click.IntRange(min=1), default=40, show_default=True,
              help="SFD-v snapshot interval in ticks; its curve (2 NFE) scores the first snapshot, or with --partial "
                   "the first kept dump, at or past each multiple")
@click.option("--curve_2_every", type=click.IntRange(min=1), default=50, show_default=True,
              help="Second-stage snapshot interval in ticks; its curve (1 NFE) scores each, like --curve_v_every")
@click.option("--stage2_from", type=click.IntRange(min=1), default=None,
              help="Start the second stage from the SFD-v run's snapshot at this kimg (its "
                   "network-snapshot-<kimg>.safetensors, one every --curve_v_every ticks) instead of the finished "
                   "SFD-v model: a shorter first stage where machine time is short. Its row and folder name it")
@click.option("--dump_every", help="Training-state dump interval of the distillations in ticks",
              type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--rows", "rows_text", help=f"Comma-separated rows to compute  [default: all: {','.join(ROW_KEYS)}]",
              default=None)
@click.option("--partial", is_flag=True,
              help="Distil nothing: score unfinished distillations at their latest training-state dump (the table "
                   "says 'K of B kimg'); finished ones as usual")
@click.option("--table_only", is_flag=True, help="Only write the table (and plots) of the rows already finished")
@click.option("--rows_file", "rows_files", multiple=True,
              help="Rows an earlier run wrote beside its table (<out stem>-rows.json), counted as finished here: "
                   "rebuild a table without its work folder, or merge runs made elsewhere (repeatable)")
@click.option("--plots", is_flag=True, help="Also write <out>-nfe.png and <out>-curve.png (needs matplotlib)")
@click.option("--channels_last", type=bool, default=False, show_default=True,
              help="Channels-last networks for sampling and distillation (same numbers, faster on some machines)")
@click.option("--compile", "compile_", type=bool, default=False, show_default=True,
              help="torch.compile the sampling and distillation calls (same numbers, ~1 min compile per network)")
@click.option("--workdir", default="./exps/fmnist-table", show_default=True,
              help="Resumable state of this run; rerun the same command to continue it")
@click.option("--out", help="Markdown table to write; a file <out stem>-notes.md next to it (the rows' provenance) "
                           "is appended verbatim", default=os.path.join(REPO, "experiments", "fmnist_table.md"),
              show_default=True)
@click.option("--device", default=None)
def main(teacher, detector, ref, teacher_ref, num, kimg, kimg_v, kimg2, row_kimg, batch, lr, lr2, thresholding,
         sample_batch, reference_steps, tick, curve_every, curve_v_every, curve_2_every, stage2_from, dump_every,
         rows_text, partial, table_only, rows_files, plots, channels_last, compile_, workdir, out, device):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    full_fp32()  # rows made on a GPU compare with rows made on a CPU
    wanted = parse_rows(rows_text)
    budgets = row_budgets(kimg, kimg_v, kimg2, row_kimg)
    for path, opt in ((teacher, "--teacher"), (detector, "--detector"), (ref, "--ref"),
                      (teacher_ref, "--teacher_ref")):
        if not os.path.isfile(path):
            raise CommandError(f"{opt}: no file {path}; pass an existing file")
    settings = dict(teacher=file_id(teacher), detector=file_id(detector), teacher_ref=file_id(teacher_ref), num=num,
                    batch=batch, lr=lr, lr2=lr2, thresholding=thresholding, reference_steps=reference_steps,
                    tick=tick, curve_every=curve_every)
    merged = [read_rows_file(path, settings) for path in rows_files]  # refused before the work folder is made
    work = WorkFolder(workdir, settings)
    for rows in merged:
        work.merge_rows(rows)
    if not table_only:
        runs = Distillations(work, budgets, batch, tick, dump_every, partial, device,
                             dict(channels_last=channels_last, compile=compile_))
        sampling = Sampling(teacher, num, sample_batch, device, channels_last, compile_)
        maker = RowMaker(work, sampling, runs, detector, teacher_ref, ref, reference_steps)
        first_stage = dict(FIRST_STAGE, lr=lr, thresholding=thresholding)
        maker.teacher_rows(wanted, thresholding)
        maker.sfd_rows(wanted, teacher, first_stage, curve_every)
        if "sfdv" in wanted:
            maker.sfdv_rows(teacher, first_stage, curve_v_every)
        if "stage2" in wanted:
            maker.stage2_rows(teacher, first_stage, curve_v_every, lr2, curve_2_every, stage2_from)
        work.reload_rows()  # also the rows other processes added to the folder meanwhile
    write_table(out, work, settings)
    write_rows_file(out, work, settings)
    if plots:
        write_plots(os.path.splitext(out)[0], work)


if __name__ == "__main__":
    main()
