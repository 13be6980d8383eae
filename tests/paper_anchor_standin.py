"""Stands in for the paper-code timer (`.anchors/bench_paper.py`) where a checkout has none (CI).

It refuses, as argparse would (exit 2), any option that the real timer's recorded `--help` does not list, a
missing value or a value outside the listed choices; then it prints the real timer's recorded JSON lines and appends
them to `--json FILE`, as the timer does. See tests/data/paper_anchor/README.md.
"""

import os
import re
import sys

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "paper_anchor")


def interface():
    """{option: None for a flag, else the set of allowed values (empty: any)} from the recorded usage lines."""
    with open(os.path.join(HERE, "help.txt")) as f:
        usage = f.read().split("\n\n", 1)[0]
    options = {}
    for name, metavar in re.findall(r"\[(--[\w-]+)(?: ([^\]]+))?\]", usage):
        if not metavar:
            options[name] = None
        elif metavar.startswith("{"):
            options[name] = set(metavar.strip("{}").split(","))
        else:
            options[name] = set()
    return options


def refuse(message):
    print(f"usage: bench_paper.py [-h] ...\nbench_paper.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    options, given = interface(), {}
    args = list(argv)
    while args:
        token = args.pop(0)
        name, eq, value = token.partition("=")
        if name not in options:
            refuse(f"unrecognized arguments: {token}")
        if options[name] is None:
            if eq:
                refuse(f"argument {name}: ignored explicit argument {value!r}")
            given[name] = True
            continue
        if not eq:
            if not args or args[0].startswith("--"):
                refuse(f"argument {name}: expected one argument")
            value = args.pop(0)
        if options[name] and value not in options[name]:
            refuse(f"argument {name}: invalid choice: {value!r}")
        given[name] = value
    with open(os.path.join(HERE, "tiny.jsonl")) as f:
        lines = f.read()
    print(lines, end="")
    if "--json" in given:
        with open(given["--json"], "a") as f:
            f.write(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
