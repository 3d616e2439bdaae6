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
    _names, _plain, _fresh, _required = frozenset(), {}, (), ()    # see __init_subclass__
    __hash__ = None     # mutable, like an eq=True dataclass

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        fields = cls._fields
        cls._names = frozenset(name for name, _ in fields)
        # What an instance starts from, every field in order: the plain
        # defaults, None for the fields made fresh for each instance and
        # for the required ones (checked in __init__).
        cls._plain = {name: None if d is REQUIRED or d is list or d is dict else d
                      for name, d in fields}
        cls._fresh = tuple((name, d) for name, d in fields if d is list or d is dict)
        cls._required = tuple(name for name, d in fields if d is REQUIRED)

    def __init__(self, *args, **kw):
        fields = self._fields
        if args:
            if len(args) > len(fields):
                raise TypeError(f"{type(self).__name__}() takes at most {len(fields)} positional arguments")
            for (name, _), value in zip(fields, args):
                if name in kw:
                    raise TypeError(f"{type(self).__name__}() got multiple values for {name!r}")
                kw[name] = value
        if not self._names.issuperset(kw):
            bad = next(k for k in kw if k not in self._names)
            raise TypeError(f"{type(self).__name__}() got an unexpected argument {bad!r}")
        for name in self._required:
            if name not in kw:
                raise TypeError(f"{type(self).__name__}() missing argument {name!r}")
        # Attributes in field order (repr and vars() list them so), as
        # setattr() one by one did, at a fraction of its cost: a Record is
        # made for every envelope and recipient a delivery reads.
        d = self.__dict__
        d.update(self._plain)
        for name, factory in self._fresh:
            if name not in kw:
                d[name] = factory()
        d.update(kw)

    def __repr__(self):
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name, _ in self._fields)
        return f"{type(self).__name__}({inner})"

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n, _ in self._fields)
