"""RFC 5321 paths: what the SMTP server and the injector accept and refuse."""

import re

import pytest
from hypothesis import given, settings, strategies as st

from pymta import address as A
from pymta.status import AddressError

pytestmark = pytest.mark.unit   # pure units: make test-fast runs them


@pytest.mark.parametrize("text,expected", [
    ("<user@example.com>", "user@example.com"),
    ("<User.Name+tag@Example.COM>", "User.Name+tag@Example.COM"),
    ('<"john doe"@example.com>', '"john doe"@example.com'),
    ('<"plain"@example.com>', "plain@example.com"),
    ("<@relay.example,@other.example:user@example.com>", "user@example.com"),
    ("<user@[192.0.2.1]>", "user@[192.0.2.1]"),
    ("<user@[IPv6:2001:db8::1]>", "user@[IPv6:2001:db8::1]"),
    ("<postmaster@example.com>", "postmaster@example.com"),
])
def test_valid_paths_are_accepted_and_normalized(text, expected):
    addr, rest = A.parse_path(text)
    assert addr == expected
    assert rest == ""


def test_esmtp_parameters_follow_the_path():
    addr, rest = A.parse_path("<a@b.example> SIZE=1000 BODY=8BITMIME")
    assert addr == "a@b.example"
    assert A.parse_params(rest) == {"SIZE": "1000", "BODY": "8BITMIME"}


def test_null_sender_only_where_allowed():
    assert A.parse_path("<>", allow_null=True) == ("", "")
    with pytest.raises(AddressError):
        A.parse_path("<>")


@pytest.mark.parametrize("text", [
    "user@example.com",              # no brackets
    "<user@example.com",             # unterminated
    "<user@@example.com>",
    "<us er@example.com>",
    "<user@exa_mple.com>",
    "<user@-example.com>",
    "<user@[999.1.1.1]>",
    "<user@[IPv6:zz::1]>",
    "<user\x00@example.com>",
    "<user@example.com>junk",
    "<" + "a" * 65 + "@example.com>",            # local part over 64
    "<a@" + ("b" * 60 + ".") * 5 + "com>",       # domain over 255 / path over 256
    "<@relay:>",
    "<a@b.example> SIZE=1 SIZE=2",
])
def test_malformed_paths_get_501(text):
    with pytest.raises(AddressError) as e:
        addr, rest = A.parse_path(text)
        A.parse_params(rest)
    assert e.value.reply.code == 501
    assert e.value.reply.enhanced.startswith("5.")


@pytest.mark.parametrize("addr,routed", [
    ("user@example.com", False),
    ("user%other.example@example.com", True),
    ("host!user@example.com", True),
    ('"user@other.example"@example.com', True),
    ('"john doe"@example.com', False),
])
def test_routing_tricks_are_recognised(addr, routed):
    assert A.has_routing(addr) is routed


def test_unqualified_addresses_get_the_origin():
    assert A.qualify("root", "host.example") == "root@host.example"
    assert A.qualify("a@b.example", "host.example") == "a@b.example"
    assert A.qualify("", "host.example") == ""


def test_xtext_round_trip():
    for s in ["rfc822;a+b=c@example.com", "plain", "sp ace"]:
        assert A.xtext_decode(A.xtext_encode(s)) == s


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_text_gives_an_address_or_a_clean_501(text):
    try:
        addr, rest = A.parse_path(text, allow_null=True)
        A.parse_params(rest)
    except AddressError as e:
        assert e.reply.code == 501
        return
    assert len(addr) <= A.PATH_MAX
    assert not any(ord(c) < 32 for c in addr)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_decoded_leniently_never_crash(data):
    text = data.decode("utf-8", "surrogateescape")
    try:
        A.parse_path("<" + text + ">", allow_null=True)
    except AddressError:
        pass


# The grammar, as regular expressions: the parsers above are written without
# them (sendmail must not import re) and must agree with them.
_ATEXT = r'[^\x00-\x20\x7f"(),.:;<>@\[\\\]]'
_GRAMMAR_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_GRAMMAR_LABEL = re.compile(r"(?!-)[^\x00-\x2c\x2e\x2f\x3a-\x40\x5b-\x60\x7b-\x7f]{1,63}(?<!-)")
_GRAMMAR_PARAM = re.compile(r"([A-Za-z0-9][A-Za-z0-9\-]*)(?:=([^\x00-\x20=\x7f]+))?")
_tricky = st.lists(st.sampled_from(list('ab.-"\\ @\t\n\x01\x7f()<>[]:;,=+2BF0é\udcc3xZ%!')),
                   max_size=70).map("".join) | st.text(max_size=20)


@settings(max_examples=1500, deadline=None)
@given(_tricky)
def test_the_parsers_agree_with_the_grammar(text):
    assert A.is_dot_atom(text) == bool(_GRAMMAR_DOT_ATOM.fullmatch(text))
    assert A._is_label(text) == bool(_GRAMMAR_LABEL.fullmatch(text))
    m = _GRAMMAR_PARAM.fullmatch(text)
    if text and text.split() == [text]:     # one word, as parse_params sees them
        try:
            got = A.parse_params(text)
        except AddressError:
            got = None
        assert got == ({m.group(1).upper(): m.group(2)} if m else None)
    if text.startswith('"') and text.endswith('"') and len(text) >= 2:
        assert A.unquote_local(text) == re.sub(r"\\(.)", r"\1", text[1:-1])
    assert A.xtext_decode(text) == re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), text)
