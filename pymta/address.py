"""RFC 5321 mailbox paths: parse, unquote, validate, and spot routing tricks.

An address is kept as text ``local@domain`` with the local part in its
canonical form (quoted only where RFC 5321 requires it). The null sender is
the empty string. Limits (RFC 5321 section 4.5.3.1): local part 64 octets,
domain 255, path 256.
"""

from .status import AddressError, Reply

LOCAL_PART_MAX = 64
DOMAIN_MAX = 255
PATH_MAX = 256

# The character classes as sets of what they exclude (every other character,
# non-ASCII too, is in). No regular expressions: sendmail imports this
# module, and importing re costs its start-up (its latency) a third.
CONTROLS = frozenset(map(chr, [*range(0x20), 0x7f]))
# atext, and the dot between atoms: RFC 5322 3.2.3, non-ASCII allowed (RFC 6531)
_NOT_ATEXT = CONTROLS | frozenset(' "(),:;<>@[\\]')
# letters, digits, hyphen (and non-ASCII, for U-labels)
_NOT_LABEL = frozenset(map(chr, [*range(0x2d), 0x2e, 0x2f, *range(0x3a, 0x41),
                                 *range(0x5b, 0x61), *range(0x7b, 0x80)]))
_NOT_XVALUE = CONTROLS | frozenset(" =")    # esmtp-value: RFC 5321 4.1.2
_KEYWORD = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-")
_HEX_UPPER = frozenset("0123456789ABCDEF")


def is_dot_atom(text):
    """atext+ ("." atext+)*"""
    return (bool(text) and text[0] != "." and text[-1] != "." and ".." not in text
            and _NOT_ATEXT.isdisjoint(text))


def _is_label(label):
    return (0 < len(label) <= 63 and label[0] != "-" and label[-1] != "-"
            and _NOT_LABEL.isdisjoint(label))


def _bad(text, code=501, enhanced="5.1.3"):
    return AddressError(text, Reply(code, enhanced, text))


def split(address):
    """'user@dom' -> ('user', 'dom'); the @ is the last one outside quotes."""
    if address.startswith('"'):
        # Find the closing quote, honouring backslash escapes.
        i, n = 1, len(address)
        while i < n:
            c = address[i]
            if c == "\\":
                i += 2
                continue
            if c == '"':
                break
            i += 1
        rest = address[i + 1:]
        if rest.startswith("@"):
            return address[: i + 1], rest[1:]
        if rest == "":
            return address, ""
        local, _, domain = address.rpartition("@")
        return local, domain
    local, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return local, domain


def unquote_local(local):
    """'"a b"' -> 'a b'; a dot-atom is returned as is."""
    if len(local) >= 2 and local[0] == local[-1] == '"':
        inner = local[1:-1]
        if "\\" not in inner:
            return inner
        out, i, n = [], 0, len(inner)
        while i < n:
            c = inner[i]
            if c == "\\" and i + 1 < n and inner[i + 1] != "\n":
                c = inner[i + 1]
                i += 1
            out.append(c)
            i += 1
        return "".join(out)
    return local


def quote_local(local):
    """The canonical RFC 5321 form of a local part."""
    if is_dot_atom(local):
        return local
    escaped = local.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def check_domain(domain):
    """Validate a domain or an address literal; raises AddressError."""
    if len(domain) > DOMAIN_MAX:
        raise _bad("Domain name too long", 501, "5.1.3")
    if domain.startswith("["):
        if not domain.endswith("]"):
            raise _bad("Bad address literal", 501, "5.1.3")
        literal = domain[1:-1]
        import ipaddress   # only for literals: most runs never need it
        try:
            if literal.lower().startswith("ipv6:"):
                ipaddress.IPv6Address(literal[5:])
            else:
                ipaddress.IPv4Address(literal)
        except ValueError:
            raise _bad("Bad address literal", 501, "5.1.3") from None
        return
    name = domain[:-1] if domain.endswith(".") else domain
    if not name or not all(_is_label(lbl) for lbl in name.split(".")):
        raise _bad("Bad domain name syntax", 501, "5.1.3")


def literal_ip(domain):
    """'[192.0.2.1]' -> '192.0.2.1', '[IPv6:::1]' -> '::1', else None."""
    if domain.startswith("[") and domain.endswith("]"):
        lit = domain[1:-1]
        return lit[5:] if lit.lower().startswith("ipv6:") else lit
    return None


def check_local(local):
    if len(local.encode("utf-8", "surrogateescape")) > LOCAL_PART_MAX:
        raise _bad("Local part too long", 501, "5.1.3")
    if not local:
        raise _bad("Empty local part", 501, "5.1.3")
    if local.startswith('"'):
        if not (len(local) >= 2 and local.endswith('"')):
            raise _bad("Bad quoted local part", 501, "5.1.3")
        inner = local[1:-1]
        bare_quote = any(c == '"' and (i == 0 or inner[i - 1] != "\\") for i, c in enumerate(inner))
        if bare_quote or not CONTROLS.isdisjoint(inner.replace("\t", "")):
            raise _bad("Bad quoted local part", 501, "5.1.3")
        return
    if not is_dot_atom(local):
        raise _bad("Bad local part syntax", 501, "5.1.3")


def normalize(address):
    """Canonical text of 'local@domain': local part re-quoted, domain kept."""
    local, domain = split(address)
    local = quote_local(unquote_local(local))
    return f"{local}@{domain}" if domain else local


def parse_path(text, allow_null=False, require_domain=True):
    """Parse an SMTP path with its angle brackets, e.g. '<user@dom>'.

    Returns (address, rest) where ``rest`` is the text after the path (the
    ESMTP parameters). Source routes ``<@a,@b:user@dom>`` are stripped as RFC
    5321 section 4.1.1.3 allows. Raises AddressError with the 501 to send.
    """
    text = text.lstrip(" ")
    if not text.startswith("<"):
        raise _bad("Syntax: address must be in angle brackets <...>", 501, "5.5.4")
    # Find the closing '>' outside quotes.
    i, n, inq = 1, len(text), False
    while i < n:
        c = text[i]
        if c == "\\" and inq:
            i += 2
            continue
        if c == '"':
            inq = not inq
        elif c == ">" and not inq:
            break
        i += 1
    else:
        raise _bad("Syntax: missing > after address", 501, "5.5.4")
    inner, rest = text[1:i], text[i + 1:]
    if len(inner) + 2 > PATH_MAX:
        raise _bad("Path too long", 501, "5.1.3")
    if rest and not rest.startswith(" "):
        raise _bad("Syntax: junk after address", 501, "5.5.4")
    if inner == "":
        if allow_null:
            return "", rest.strip()
        raise _bad("Null address not allowed here", 501, "5.1.3")
    if inner.startswith("@"):
        # A source route: '@a,@b:user@dom'. Keep only the mailbox.
        route, colon, mailbox = inner.partition(":")
        if not colon or not all(r.startswith("@") and len(r) > 1 for r in route.split(",")):
            raise _bad("Bad source route", 501, "5.1.3")
        for r in route.split(","):
            check_domain(r[1:])
        inner = mailbox
    address = check_mailbox(inner, require_domain=require_domain)
    return address, rest.strip()


def check_mailbox(address, require_domain=True):
    """Validate 'local@domain' (or a bare local part when allowed); returns
    the normalized text or raises AddressError."""
    if not CONTROLS.isdisjoint(address):
        raise _bad("Control character in address", 501, "5.1.3")
    local, domain = split(address)
    check_local(local)
    if domain:
        check_domain(domain)
    elif require_domain:
        raise _bad("Address must have a domain", 501, "5.1.3")
    return normalize(address)


def parse_params(text):
    """'SIZE=123 BODY=8BITMIME' -> {'SIZE': '123', 'BODY': '8BITMIME'}."""
    params = {}
    for word in text.split():
        key, eq, value = word.partition("=")
        if (not key or key[0] == "-" or not _KEYWORD.issuperset(key)
                or eq and (not value or not _NOT_XVALUE.isdisjoint(value))):
            raise _bad(f"Bad parameter syntax: {word[:40]}", 501, "5.5.4")
        key = key.upper()
        if key in params:
            raise _bad(f"Parameter {key} given twice", 501, "5.5.4")
        params[key] = value if eq else None
    return params


def has_routing(address):
    """True when the local part carries routing (% or !), or it holds another @.

    Such addresses (``user%other@here``, ``host!user@here``, ``"u@other"@here``)
    are never relayed on behalf of a client outside mynetworks.
    """
    local, _ = split(address)
    bare = unquote_local(local)
    return any(c in bare for c in "%!@")


def qualify(address, origin):
    """Append @origin to an unqualified address; the null sender stays empty."""
    if address == "":
        return ""
    local, domain = split(address)
    return address if domain else f"{local}@{origin}"


def domain_of(address):
    return split(address)[1].lower().rstrip(".")


def local_of(address):
    return unquote_local(split(address)[0])


def xtext_decode(text):
    """RFC 3461 xtext: '+2B' -> '+'."""
    if "+" not in text:
        return text
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        hexa = text[i + 1:i + 3]
        if c == "+" and len(hexa) == 2 and _HEX_UPPER.issuperset(hexa):
            out.append(chr(int(hexa, 16)))
            i += 3
            continue
        out.append(c)
        i += 1
    return "".join(out)


def xtext_encode(text):
    return "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else f"+{ord(c):02X}"
                   for c in text)
