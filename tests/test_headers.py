"""The header fields pymta writes: one Received: shape, one date format."""

import email.utils

import pytest
from hypothesis import given, settings, strategies as st

from pymta import headers

pytestmark = pytest.mark.unit   # pure units: make test-fast runs them


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=253402300799))
def test_date_is_what_the_email_package_writes(t):
    assert headers.date(t) == email.utils.formatdate(t, localtime=True)


def test_received_with_one_recipient_and_without():
    t = 1700000000
    one = headers.received("6ASHBJ000012345", "mx.example.test", "pymta",
                           "from c.example (unknown [192.0.2.1])", "ESMTPS", "u@example.test", t)
    assert one == ("Received: from c.example (unknown [192.0.2.1])\n\tby mx.example.test (pymta) "
                   "with ESMTPS id 6ASHBJ000012345\n\tfor <u@example.test>; "
                   f"{headers.date(t)}\n").encode()
    local = headers.received("6ASHBJ000012345", "mx.example.test", "pymta",
                             "(from alice@localhost)", t=t)
    assert local == ("Received: (from alice@localhost)\n\tby mx.example.test (pymta) "
                     f"id 6ASHBJ000012345;\n\t{headers.date(t)}\n").encode()


def test_auth_warning_shows_controls_as_question_marks():
    assert headers.auth_warning("mx.example.test", "bob", "a\r\nBcc: x@y") == \
        b"X-Authentication-Warning: mx.example.test: bob set sender to a??Bcc: x@y using -f\n"
    assert headers.auth_warning("h", "bob", "") == \
        b"X-Authentication-Warning: h: bob set sender to <> using -f\n"
