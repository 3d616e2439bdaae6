"""pymta: a sendmail-compatible mail transfer agent written in Python.

Not the unrelated "pymta" SMTP test library on PyPI: install this one from its
source tree (``make install`` or ``pip install .``).
"""
from setuptools import setup

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
    install_requires=[
        "dnspython>=2.3",
        "python-daemon>=3.0",
        "lockfile>=0.12",
        "dkimpy>=1.1.4",
    ],
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
