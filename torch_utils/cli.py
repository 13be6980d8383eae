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


def check_output_dir(path, option):
    """A folder that a command will create (with its parents) or write into: refused in one line when it names a
    file or sits under one, or when its nearest existing folder is not writable. Nothing is created here."""
    full = os.path.abspath(str(path))
    if os.path.exists(full) and not os.path.isdir(full):
        raise click.BadParameter(f"{path} is a file, not a folder; give a folder path", param_hint=option)
    parent = full
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise click.BadParameter(f"{parent} is a file, so {path} cannot be made; give a folder path",
                                 param_hint=option)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise click.BadParameter(f"{parent} is not writable; give a folder you can write to", param_hint=option)
    return full


def check_output_file(path, option):
    """A file that a command will write (its folder created if missing): refused when it is a folder, or when its
    folder cannot be made or written."""
    if os.path.isdir(str(path)):
        raise click.BadParameter(f"{path} is a folder; give a file name", param_hint=option)
    try:
        check_output_dir(os.path.dirname(os.path.abspath(str(path))), option)
    except click.BadParameter as e:
        raise click.BadParameter(f"{path} cannot be written: {e.message.split(';')[0]}", param_hint=option) from None
    return os.path.abspath(str(path))


def check_input_file(path, option):
    """A file that a command will read: refused when it is missing, a folder or unreadable."""
    if not os.path.exists(path):
        raise click.BadParameter(f"no such file: {path}", param_hint=option)
    if os.path.isdir(path):
        raise click.BadParameter(f"{path} is a folder; give a file", param_hint=option)
    if not os.access(path, os.R_OK):
        raise click.BadParameter(f"{path} is not readable", param_hint=option)
    return path


def check_device(name, option="--device"):
    """The torch device a command will run on (None: CUDA when there is one, else the CPU), refused in one line when
    torch does not know it or this machine lacks it."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise click.BadParameter(f"{name!r} is not a device; use cpu, cuda or cuda:N", param_hint=option) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise click.BadParameter(f"{name}: this machine has no CUDA device (or this torch build has no CUDA); "
                                     "use --device=cpu", param_hint=option)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise click.BadParameter(f"{name}: only {torch.cuda.device_count()} CUDA device(s) here",
                                     param_hint=option)
    elif device.type != "cpu":
        raise click.BadParameter(f"{name!r}: only cpu and cuda devices are supported", param_hint=option)
    return device


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


def leave_exit_code(code):
    """Write the exit code to $SFD_EXIT_CODE_FILE where a launcher asked for it (launch.sh: torchrun itself always
    exits with 1, so the launcher reads our 2 for bad input from there)."""
    path = os.environ.get("SFD_EXIT_CODE_FILE")
    if path:
        try:
            with open(path, "w") as f:
                f.write(f"{code}\n")
        except OSError:
            pass


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
        leave_exit_code(e.exit_code)
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
