"""pymta: a sendmail-compatible mail transfer agent written in Python.

Not the unrelated "pymta" SMTP test library on PyPI: install this one from its
source tree (``make install`` or ``pip install .``).
"""
import glob
import os

from setuptools import setup

# The dependency table (pymta/deps.py), read without importing the package.
_deps = {}
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pymta", "deps.py")) as _f:
    exec(_f.read(), _deps)

setup(
    name="pymta",
    version="0.1.0",
    description=("A classic Unix mail transfer agent (SMTP server, queue, "
                 "local and remote delivery) with a sendmail-compatible "
                 "command line; not the PyPI 'pymta' test library"),
    long_description=__doc__,
    license="MIT",
    packages=["pymta"],
    python_requires=">=3.11",
    # The minimums are Debian 12's and are what `make test` runs against.
    install_requires=_deps["install_requires"](),
    extras_require={
        "test": ["pytest>=7", "pytest-timeout", "pytest-xdist", "hypothesis", "wheel", "ruff==0.17.6"],
        "plot": ["matplotlib"],
    },
    # The programs are the tree's own launchers, not console-script entry
    # points: pip's wrapper imports re and tears the interpreter down, which
    # sendmail (run once per message) would pay at every run. mailq and
    # newaliases are sendmail under their names (the name picks the role).
    scripts=["bin/sendmail", "bin/mailq", "bin/newaliases", "bin/pymta"],
    # Samples and manual pages under the installation prefix: python -m
    # pymta.devsetup finds the aliases sample in share/pymta.
    data_files=[
        ("share/pymta", ["etc/aliases", "etc/pymta.conf", "etc/pymta.dev.conf",
                         "etc/pymta.service", "etc/cron.pymta", "etc/logrotate.pymta"]),
    ] + [(f"share/man/man{n}", sorted(glob.glob(f"man/*.{n}"))) for n in (1, 5, 8)],
)
