#!/usr/bin/env python3
"""Render every man page with man --warnings (and mandoc -T lint when
installed); exit 1 on any warning. Usage: python tests/check_man.py man"""

import glob
import os
import re
import shutil
import subprocess
import sys


def pages(directory):
    return sorted(p for p in glob.glob(os.path.join(directory, "*"))
                  if re.search(r"\.[1-8]$", p))


def check(path):
    """Warnings for one page, as a list of strings."""
    env = dict(os.environ, MANWIDTH="80", LC_ALL="C.UTF-8", MAN_KEEP_FORMATTING="")
    r = subprocess.run(["man", "--warnings", "-l", path], capture_output=True, env=env,
                       stdin=subprocess.DEVNULL, timeout=60)
    problems = [line for line in r.stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    if r.returncode != 0:
        problems.append(f"man exited {r.returncode}")
    elif not r.stdout.strip():
        problems.append("rendered empty")
    if shutil.which("mandoc"):
        r = subprocess.run(["mandoc", "-T", "lint", "-W", "warning", path], capture_output=True,
                           timeout=60)
        problems += [line for line in r.stdout.decode("utf-8", "replace").splitlines()
                     if line.strip()]
    return problems


def main(argv):
    if len(argv) != 1:
        print("usage: check_man.py DIRECTORY", file=sys.stderr)
        return 2
    found = pages(argv[0])
    if not found:
        print(f"check_man: no man pages in {argv[0]}", file=sys.stderr)
        return 1
    bad = 0
    for path in found:
        problems = check(path)
        for p in problems:
            print(f"{path}: {p}")
        bad += bool(problems)
        print(f"{path}: {'ok' if not problems else 'WARNINGS'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
