"""Deterministic queues for the mailq and admin tests: fixed ids, fixed times.

Messages are written through the spool's own control-file writer
(Spool.rewrite) beside a hand-written df, so the ids and arrival times
are known in advance and the listing can be compared with a file.
"""


from pymta import envelope as E

# Arrival times: 2023-11-14 22:13:20 UTC and after.
T0 = 1700000000
FAR_FUTURE = 4102444800  # 2100-01-01


def put(spool, qid, sender, rcpts, body=b"Subject: test\n\nhello\n", held=False, **env_fields):
    """Queue a message with id ``qid``; rcpts are addresses or Recipient objects."""
    with open(spool.path("df", qid), "wb") as f:
        f.write(body)
    env = E.Envelope(id=qid, sender=sender, created=env_fields.pop("created", T0),
                     **env_fields)
    for r in rcpts:
        env.recipients.append(r if isinstance(r, E.Recipient) else E.Recipient(r))
    env.held = held
    spool.rewrite(env)
    return env


def standard_queue(spool):
    """Seven entries covering every kind of row mailq prints."""
    put(spool, "kASHWR000001001", "alice@example.test",
        ["bob@remote.test", E.Recipient("carol@remote.test", state="S"),
         E.Recipient("dave@remote.test", state="D", text="Connection refused")],
        created=T0)
    put(spool, "kASHWR000001002", "bounces@lists.example.test",
        [E.Recipient("erin@slow.test", state="D", dsn="4.4.1",
                     text="Connection timed out with mx.slow.test.")],
        body=b"x" * 2048, created=T0 + 60, attempts=3, body_type="8BITMIME",
        status="Deferred: Connection timed out with mx.slow.test.")
    put(spool, "kASHWR000001003", "", ["postmaster@example.test"], created=T0 + 120)
    put(spool, "kASHWR000001004", "mallory@spam.test", ["frank@example.test"],
        created=T0 + 180, held=True, status="suspected spam, reported by frank")
    put(spool, "kASHWR000001005", "alice@example.test", ["grace@later.test"],
        created=T0 + 240, next_try=FAR_FUTURE, attempts=1,
        status="Deferred: 451 4.7.1 Greylisted, try again later")
    with open(spool.path("df", "kASHWR000001006"), "wb") as f:
        f.write(b"Subject: torn\n\n")
    with open(spool.path("qf", "kASHWR000001006"), "w") as f:
        f.write("V1\nT1700000300\nSalice@example.test\n")
    with open(spool.path("df", "kASHWR000001007"), "wb") as f:
        f.write(b"Subject: lost\n\n")
    with open(spool.path("Qf", "kASHWR000001007"), "w") as f:
        f.write("garbage\n")
