"""pymta's dependencies, in one table.

setup.py (install_requires), ``pymta check`` (the launchers' interpreter
imports each) and ``make testpy`` (the venv the tests run the installed
launchers with, holding exactly these minimum versions) all read it. The
minimums are what Debian 12 ships, and they are what the tests run: a
feature of a later version may not be used.

To add a dependency, add a row. The last field names the parameter that
makes a dependency needed (dkimpy only signs when dkim_selector is set):
without it, a missing one is a warning of pymta check, not an error.

Run as a script, it prints the pinned minimums for pip (``make testpy``).
"""

# (distribution on PyPI, minimum version, a module to import, Debian package,
#  the parameter that makes it needed: "" for always)
REQUIRES = (
    ("dnspython", "2.3.0", "dns.resolver", "python3-dnspython", ""),
    ("python-daemon", "2.3.2", "daemon", "python3-daemon", ""),
    ("lockfile", "0.12.2", "lockfile", "python3-lockfile", ""),
    ("dkimpy", "1.1.4", "dkim", "python3-dkim", "dkim_selector"),
)


def install_requires():
    return [f"{row[0]}>={row[1]}" for row in REQUIRES]


def pinned():
    return [f"{row[0]}=={row[1]}" for row in REQUIRES]


if __name__ == "__main__":
    print(" ".join(pinned()))
