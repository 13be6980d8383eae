"""What every command-line script shares: one-line errors with exit code 2, printed once under torchrun."""

import os
import signal
import sys
import time

import click


OWN_ERROR_DELAY = 5.0  # seconds: see run()


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
            signal.signal(signal.SIGTERM, lambda *_: os._exit(e.exit_code))
            time.sleep(2 * OWN_ERROR_DELAY if isinstance(e, PeerFailed) else OWN_ERROR_DELAY)
        e.show()
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo("Aborted!", err=True)
        sys.exit(1)
