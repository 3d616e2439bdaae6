"""Process names in ps: ``pymta: master``, ``pymta: smtpd``.

Linux keeps a process's name (its "comm", 15 bytes) apart from its
arguments: ``ps -e``, ``ps -o pid,comm``, ``top`` and ``pgrep`` show it.
Writing /proc/self/comm sets it without a dependency (no setproctitle,
no ctypes). ``ps aux`` shows the arguments, which stay the command line.
"""


def set_name(name):
    """Name this process (its main thread) ``name``, cut to 15 bytes; never fails."""
    try:
        with open("/proc/self/comm", "wb") as f:
            f.write(name.encode("utf-8", "replace")[:15])
    except OSError:
        pass
