"""What every command-line script shares: one-line errors with exit code 2."""

import click


class CommandError(click.ClickException):
    """A user-facing failure (bad input, missing file, unreadable checkpoint): one line, exit code 2."""

    exit_code = 2

    def __init__(self, message):
        text = str(message).strip().splitlines()
        super().__init__(text[0] if text else "failed")
