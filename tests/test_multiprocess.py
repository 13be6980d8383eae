"""Failures under torchrun (two gloo processes on the CPU): one line from the failing rank, exit code 2 on every
rank, no rank left waiting, and torchrun names the failing rank as the root cause."""

import re
import socket

import pytest
import torch.multiprocessing as mp

from tests.conftest import torchrun


def worker_exit_codes(output):
    """{rank: exit code} from torchrun's failure report."""
    return {int(rank): int(code) for rank, code in
            re.findall(r"rank\s+: (\d+) \(local_rank: \d+\)\n\s+exitcode\s+: (-?\d+)", output)}


def root_cause_rank(output):
    report = output.split("Root Cause", 1)[1]
    return int(re.search(r"rank\s+: (\d+)", report).group(1))


@pytest.mark.slow
def test_rank0_load_failure_ends_every_rank_with_its_one_line(tmp_path):
    bad = tmp_path / "broken.pkl"
    bad.write_text("not a network pickle\n")
    p = torchrun("train.py", "--model_path", str(bad), "--batch", "4", "--total_kimg", "0.008", "--seed", "1",
                 "--device", "cpu", "--outdir", str(tmp_path / "exps"), cwd=tmp_path, timeout=240)
    out = p.stdout + p.stderr
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: {bad} is neither an SFD snapshot (.safetensors) nor an EDM network pickle (.pkl)"], out
    assert worker_exit_codes(out) == {0: 2, 1: 2}, out
    assert root_cause_rank(out) == 0, out
    assert "train.py\", line" not in out and "Connection closed" not in out, out  # no worker traceback
    assert not (tmp_path / "exps").exists()  # no half-made experiment folder


@pytest.mark.slow
def test_sample_option_error_is_printed_once(tmp_path):
    p = torchrun("sample.py", "--model_path", "7", "--exps_dir", str(tmp_path), "--seeds", "0-3", "--device",
                 "cpu", cwd=tmp_path, timeout=240)
    out = p.stdout + p.stderr
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--model_path" in errors[0], out
    assert worker_exit_codes(out) == {0: 2, 1: 2}, out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank0_first_worker(rank, port, failing_rank, results):
    import torch.distributed

    from torch_utils import distributed as dist
    from torch_utils.cli import PeerFailed

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    calls = []

    def load():
        calls.append(rank)
        if rank == failing_rank:
            raise ValueError(f"rank {rank} cannot load")
        return f"net of rank {rank}"

    try:
        outcome = dist.rank0_first(load)
    except PeerFailed:
        outcome = "PeerFailed"
    except ValueError as e:
        outcome = str(e)
    results[rank] = (outcome, len(calls))
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("failing_rank, expected", [
    (None, {0: ("net of rank 0", 1), 1: ("net of rank 1", 1)}),
    (0, {0: ("rank 0 cannot load", 1), 1: ("PeerFailed", 0)}),  # rank 1 never tries after rank 0 failed
    (1, {0: ("PeerFailed", 1), 1: ("rank 1 cannot load", 1)}),
])
def test_rank0_first_stops_every_rank_when_one_fails(failing_rank, expected):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_rank0_first_worker, args=(_free_port(), failing_rank, results), nprocs=2,
                           start_method="fork")
        assert dict(results) == expected


@pytest.mark.parametrize("rank, error, printed", [
    ("0", "own", True),
    ("1", "own", True),  # printed after the delay: rank 0 did not fail, or torchrun would have stopped us
    ("1", "peer", False),
])
def test_cli_run_prints_a_ranks_own_error_and_hides_peer_failures(monkeypatch, capsys, rank, error, printed):
    import click

    from torch_utils import cli

    @click.command()
    def command():
        raise cli.CommandError("--x: bad value") if error == "own" else cli.PeerFailed()

    slept = []
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(cli.time, "sleep", slept.append)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(command, [])
    assert exit_info.value.code == 2
    assert ("Error: --x: bad value" in capsys.readouterr().err) == printed
    expected_wait = {("0", "own"): [], ("1", "own"): [cli.OWN_ERROR_DELAY], ("1", "peer"): [2 * cli.OWN_ERROR_DELAY]}
    assert slept == expected_wait[rank, error]
