"""What every command-line script shares: one-line errors with exit code 2, printed once under torchrun."""

import os
import platform
import re
import signal
import sys
import time

import click


OWN_ERROR_DELAY = 5.0  # seconds: see run()


def parse_int_list(text, option="--seeds"):
    """'1,2,5-10' -> [1, 2, 5, 6, 7, 8, 9, 10]; anything else is a one-line error naming `option`."""
    if isinstance(text, list):
        return text
    values = []
    for part in str(text).split(","):
        part = part.strip()
        bounds = re.fullmatch(r"(\d+)-(\d+)", part)
        if bounds:
            lo, hi = int(bounds.group(1)), int(bounds.group(2))
            if hi < lo:
                raise click.BadParameter(f"range {part!r} runs backwards", param_hint=option)
            values.extend(range(lo, hi + 1))
        elif re.fullmatch(r"\d+", part):
            values.append(int(part))
        else:
            raise click.BadParameter(f"{part!r} is not a number or a range like 0-99", param_hint=option)
    if not values:
        raise click.BadParameter("no values given", param_hint=option)
    return values


def format_time(seconds):
    """12s, 3m04s or 1h02m03s."""
    m, s = divmod(int(max(seconds, 0)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class CommandError(click.ClickException):
    """A user-facing failure (bad input, missing file, unreadable checkpoint): one line, exit code 2."""

    exit_code = 2

    def __init__(self, message):
        text = str(message).strip().splitlines()
        super().__init__(text[0] if text else "failed")


class PeerFailed(click.ClickException):
    """Another rank failed and reports why; this rank stops with exit code 2 and prints nothing."""

    exit_code = 2

    def __init__(self):
        super().__init__("another rank failed")

    def show(self, file=None):
        pass


def machine_name(device):
    """The device in words, for logs and reports: 'NVIDIA H200', 'x86_64 CPU, 2 threads'."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def run(command, args=None):
    """Run a click command; its errors end the process with their exit code.

    Under torchrun the failing rank's line must be the one shown, once, and torchrun must name that rank. Rank 0
    prints and exits at once. Another rank that failed itself prints only if it is still alive after
    OWN_ERROR_DELAY (that is, rank 0 did not fail too, since torchrun stops the other ranks when one exits); a rank
    stopped by another's failure (PeerFailed) waits longer and prints nothing. SIGTERM from torchrun ends a
    waiting rank with its exit code."""
    try:
        command.main(args=args, standalone_mode=False)
    except click.ClickException as e:
        rank = int(os.environ.get("RANK", "0"))
        if rank != 0 or isinstance(e, PeerFailed):
            code = e.exit_code
            signal.signal(signal.SIGTERM, lambda *_: os._exit(code))
            time.sleep(2 * OWN_ERROR_DELAY if isinstance(e, PeerFailed) else OWN_ERROR_DELAY)
        e.show()
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo("Aborted!", err=True)
        sys.exit(1)
