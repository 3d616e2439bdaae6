"""Plain data records for the modules every sendmail run imports.

What pymta used of dataclasses (keyword and positional init with defaults,
repr, equality), without the import of dataclasses and inspect, which cost
each run of sendmail several milliseconds of its latency.
"""

REQUIRED = object()


class Record:
    """Subclasses list ``_fields``: (name, default) pairs in order. A default
    of ``list`` or ``dict`` makes a fresh one for each instance; REQUIRED
    means the caller must give it."""

    _fields = ()
    __hash__ = None     # mutable, like an eq=True dataclass

    def __init__(self, *args, **kw):
        fields = self._fields
        if len(args) > len(fields):
            raise TypeError(f"{type(self).__name__}() takes at most {len(fields)} positional arguments")
        for (name, _), value in zip(fields, args):
            if name in kw:
                raise TypeError(f"{type(self).__name__}() got multiple values for {name!r}")
            kw[name] = value
        for name, default in fields:
            if name in kw:
                value = kw.pop(name)
            elif default is REQUIRED:
                raise TypeError(f"{type(self).__name__}() missing argument {name!r}")
            elif default is list or default is dict:
                value = default()
            else:
                value = default
            setattr(self, name, value)
        if kw:
            raise TypeError(f"{type(self).__name__}() got an unexpected argument {next(iter(kw))!r}")

    def __repr__(self):
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name, _ in self._fields)
        return f"{type(self).__name__}({inner})"

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n, _ in self._fields)
