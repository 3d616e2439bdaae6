"""Every man page renders without a warning (tests/check_man.py)."""

import os
import shutil
import subprocess
import sys

import pytest

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not shutil.which("man"), reason="man is not installed")
def test_every_man_page_renders_without_warnings():
    r = subprocess.run([sys.executable, os.path.join(TOP, "tests", "check_man.py"),
                        os.path.join(TOP, "man")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_check_man_reports_a_broken_page(tmp_path):
    if not shutil.which("man"):
        pytest.skip("man is not installed")
    (tmp_path / "broken.8").write_text(".TH BROKEN 8\n.SH NAME\nbroken\n.BOGUSMACRO x\n")
    r = subprocess.run([sys.executable, os.path.join(TOP, "tests", "check_man.py"),
                        str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stdout
    assert "broken.8" in r.stdout
