"""pymta: a sendmail-compatible mail transfer agent written in Python.

Not the unrelated "pymta" SMTP test library on PyPI: install this one from its
source tree (``make install`` or ``pip install .``).
"""
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
        "test": ["pytest>=7", "pytest-timeout", "pytest-xdist", "hypothesis"],
        "plot": ["matplotlib"],
    },
    entry_points={
        "console_scripts": [
            "sendmail = pymta.cli:main",
            "mailq = pymta.cli:main",
            "newaliases = pymta.cli:main",
            "pymta = pymta.admin:main",
        ],
    },
    scripts=[],
)
