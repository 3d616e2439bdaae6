"""The control-file format: what is written is read back the same, and any
garbage read is a clean SpoolCorrupt, never a crash of the queue runner."""

from hypothesis import given, settings, strategies as st

from pymta import envelope as E
from pymta import queue_file
from pymta.status import SpoolCorrupt
import pytest

pytestmark = pytest.mark.unit   # pure units: make test-fast runs them

text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80)
ints = st.integers(min_value=0, max_value=2 ** 40)
times = st.integers(min_value=0, max_value=queue_file.TIME_MAX)   # a qf's range for times

recipients = st.builds(
    E.Recipient,
    address=text.filter(bool),
    flags=st.text(alphabet="SFDNapn", max_size=5),
    state=st.sampled_from("QDSFBX"),
    dsn=st.sampled_from(["", "2.0.0", "4.4.1", "5.1.1"]),
    text=text, orcpt=text, parent=text, relay=text,
    uid=st.integers(min_value=-1, max_value=65535),
    updated=times,
)

envelopes = st.builds(
    E.Envelope,
    id=st.just("kASHWR000002297"),
    sender=text,
    recipients=st.lists(recipients, min_size=1, max_size=5),
    created=times, last_attempt=times, attempts=st.integers(0, 1000), next_try=times,
    priority=ints, body_type=st.sampled_from(["", "7BIT", "8BITMIME"]),
    smtputf8=st.booleans(), envid=text, ret=st.sampled_from(["", "FULL", "HDRS"]),
    protocol=st.sampled_from(["", "ESMTP", "ESMTPSA", "local"]), helo=text,
    client_addr=text, client_name=text, auth_user=text,
    uid=st.integers(min_value=-1, max_value=65535), status=text, warned=st.booleans(),
)


def _comparable(env):
    d = dict(vars(env))
    d["recipients"] = [dict(vars(r)) for r in env.recipients]
    d.pop("size")
    d.pop("held")
    return d


@settings(max_examples=300, deadline=None)
@given(envelopes)
def test_control_file_round_trips(env):
    text_ = queue_file.format_control(env)
    assert text_.endswith("\n.\n")
    back = queue_file.parse_control(text_, env.id)
    assert _comparable(back) == _comparable(env)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_garbage_control_files_are_refused_cleanly(data):
    try:
        queue_file.parse_control(data.decode("utf-8", "surrogateescape"), "kASHWR000002297")
    except SpoolCorrupt:
        pass


@settings(max_examples=200, deadline=None)
@given(envelopes, st.integers(min_value=0, max_value=10 ** 6))
def test_a_torn_control_file_is_never_taken_for_whole(env, cut):
    text_ = queue_file.format_control(env)
    cut = cut % len(text_)
    torn = text_[:cut]
    try:
        queue_file.parse_control(torn, env.id)
    except SpoolCorrupt:
        return
    raise AssertionError("a truncated control file was accepted")
