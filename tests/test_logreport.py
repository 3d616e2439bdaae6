"""pymta report over a fixture maillog: totals, reasons, tops, delays, hours, SVG."""

import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest


from conftest import BIN
from pymta import logreport

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SAMPLE = os.path.join(DATA, "maillog.sample")


def report(inst, *args):
    cmd = [sys.executable, os.path.join(BIN, "pymta"), "-C", inst.conf_path, "report", *args]
    return subprocess.run(cmd, capture_output=True, timeout=60)


@pytest.mark.unit
def test_counts_from_the_fixture_log():
    st = logreport.read_files([SAMPLE])
    assert st.received == 5
    assert st.received_bytes == 2048 + 1000 + 5000 + 300000 + 301000
    assert st.delivered == 4
    assert st.deferred == 1 and st.deferred_ids == {"kASHWR000004002"}
    assert st.bounced == 2
    assert st.bounce_reports == 2
    assert st.rejected == 4
    assert st.reject_reasons.most_common(1)[0] == (
        "550 5.1.1 <>: Recipient address rejected: User unknown", 2)
    assert st.senders["alice@example.test"] == 2
    assert st.sender_bytes["alice@example.test"] == 3048
    assert st.senders["<>"] == 2
    assert "not-ours@example.test" not in st.senders
    assert st.recipients["bob@example.test"] == 1
    assert st.recipient_bytes["bob@example.test"] == 301000
    assert sorted(st.delays) == [1, 1, 3, 3900]
    assert st.hours[10]["rejected"] == 4 and st.hours[9]["received"] == 2
    assert st.admin["held"] == 2 and st.admin["removed"] == 1 and st.admin["released"] == 1


@pytest.mark.unit
def test_delay_parsing_and_percentiles():
    assert logreport.parse_delay("00:00:07") == 7
    assert logreport.parse_delay("2+01:00:00") == 2 * 86400 + 3600
    assert logreport.parse_delay("bogus") is None
    values = list(range(1, 101))
    assert logreport.percentile(values, 50) == 50
    assert logreport.percentile(values, 95) == 95
    assert logreport.percentile([], 50) is None


def test_text_report_through_the_command(inst):
    r = report(inst, SAMPLE)
    assert r.returncode == 0, r.stderr
    text = r.stdout.decode()
    assert "Period: Nov 28 09:00:01 to Nov 28 12:11:00" in text
    assert "         5  received (594.8k bytes)" in text
    assert "         4  rejected" in text
    assert "         2  550 5.1.1 <>: Recipient address rejected: User unknown" in text
    assert "p50=1s  p90=1h05m  p95=1h05m  p99=1h05m  max=1h05m  (4 deliveries)" in text
    assert "         2     3.0k  alice@example.test" in text
    assert "  10:00         0         1         0         0         4         1h05m" in text
    assert "         2  held by an administrator" in text


def test_svg_chart_is_well_formed(inst, tmp_path):
    svg = tmp_path / "mail.svg"
    r = report(inst, "--svg", str(svg), SAMPLE)
    assert r.returncode == 0, r.stderr
    root = ET.parse(svg).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    rects = root.findall("{http://www.w3.org/2000/svg}rect")
    assert len(rects) == 1 + 24 * 4 + 4


def test_png_needs_matplotlib_only_when_asked(inst, tmp_path):
    png = tmp_path / "mail.png"
    r = report(inst, "--png", str(png), SAMPLE)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert r.returncode == 69
        assert b"needs matplotlib" in r.stderr
    else:
        assert r.returncode == 0 and png.read_bytes().startswith(b"\x89PNG")


def test_default_log_is_maillog_file(inst):
    with open(inst.params["maillog_file"], "w") as f:
        f.write(open(SAMPLE).read())
    r = report(inst)
    assert r.returncode == 0
    assert b"         5  received" in r.stdout


def test_missing_log_file(inst, tmp_path):
    r = report(inst, str(tmp_path / "nope.log"))
    assert r.returncode == 66
    assert b"No such file" in r.stderr
