# pymta: make run (start a development server), make test, make install.
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
PREFIX  ?= /usr/local
DESTDIR ?=
SBINDIR ?= $(PREFIX)/sbin
BINDIR  ?= $(PREFIX)/bin
MANDIR  ?= $(PREFIX)/share/man
SYSCONFDIR ?= /etc/pymta
DEVCONF := etc/pymta.dev.conf
PYTEST_ARGS ?=
# TESTPY: the interpreter throwaway users run in tests (tests/users.py) and
# the one `make install` launchers are tested with. /root is 0700, so no
# other user can run this checkout's .venv: TESTPY is a venv made from
# Debian's /usr/bin/python3 at a world-readable path outside the checkout,
# holding the MINIMUM dependency versions pymta supports (those Debian 12
# ships). Built once by `make testpy` (run by `make test`); rebuilt only
# when TESTPY_REQS change. Must be owned by the user running make.
TESTPY  ?= /var/tmp/pymta-testpy
TESTPY_BASE ?= /usr/bin/python3
# The minimum versions, from the dependency table pymta/deps.py (one row per
# dependency: add one there and setup.py, pymta check and this venv follow).
TESTPY_REQS := $(shell $(TESTPY_BASE) pymta/deps.py 2>/dev/null || python3 pymta/deps.py)
# The interpreter `make install` writes into the launchers. Empty: the one
# the last install used (remembered in $(PREFIX)/lib/pymta/INSTALL), else
# /usr/bin/python3 (Debian's python3-dnspython, python3-daemon and
# python3-lockfile packages). Set it once, e.g. INSTALL_PYTHON=/opt/venv/bin/python;
# later installs (upgrades) keep it.
INSTALL_PYTHON ?=

.PHONY: all venv testpy lint compile run dev-setup test test-fast man check-man bench install uninstall clean

all: venv

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# Byte-compile explicitly: sendmail runs once per message and its start-up
# is its latency, even where PYTHONDONTWRITEBYTECODE is set.
compile: venv
	$(PY) -m compileall -q pymta

venv: $(VENV)/.installed

# The development instance: everything under ./var, SMTP on 127.0.0.1:2525,
# run as the invoking user (mail_owner=$(id -un)): a checkout in /root is
# out of the mail user's reach.
dev-setup: venv
	mkdir -p var/log
	$(PY) -m pymta.devsetup $(DEVCONF)

run: dev-setup compile
	@echo "pymta: SMTP on 127.0.0.1:2525, queue in var/spool, mailboxes in var/mail (Ctrl-C stops)"
	$(PY) bin/sendmail -C $(DEVCONF) -O mail_owner=$$(id -un) -bD -q1m

# Idempotent and quick when done: built under a temporary name, then renamed
# into place (two makes at once cannot leave a half-built venv), umask 022 so
# that every user can read and run it.
testpy:
	@umask 022; \
	if [ -d '$(TESTPY)' ] && [ ! -O '$(TESTPY)' ]; then \
	    echo "$(TESTPY) is not owned by $$(id -un): refusing to use it" >&2; exit 1; fi; \
	if [ "$$(cat '$(TESTPY)/.pymta-reqs' 2>/dev/null)" != '$(TESTPY_REQS)' ]; then \
	    tmp='$(TESTPY)'.tmp.$$$$; rm -rf "$$tmp"; \
	    $(TESTPY_BASE) -m venv "$$tmp" && \
	    "$$tmp/bin/python" -m pip install -q --disable-pip-version-check $(TESTPY_REQS) && \
	    chmod -R go-w,a+rX "$$tmp" && echo '$(TESTPY_REQS)' > "$$tmp/.pymta-reqs" && \
	    rm -rf '$(TESTPY)' && mv -T "$$tmp" '$(TESTPY)' || { rm -rf "$$tmp"; exit 1; }; \
	    echo "testpy: $(TESTPY) ($(TESTPY_REQS))"; fi

lint: venv
	$(VENV)/bin/ruff check --no-cache pymta tests bin bench

test: venv testpy lint
	PYMTA_TESTPY='$(TESTPY)' $(PY) -m pytest -q -n 2 --timeout 600 -p no:cacheprovider $(PYTEST_ARGS) tests

# The pure units only (no process, no socket; pytest -m unit): seconds, for
# the edit-test loop. make test runs everything, these included.
test-fast: venv
	$(PY) -m pytest -q -p no:cacheprovider -m unit $(PYTEST_ARGS) tests

man: check-man
check-man:
	$(PYTHON) tests/check_man.py man

bench: venv compile
	$(PY) bench/run.py

# install and uninstall need only python3 and this tree: no venv, no PyPI.
INSTALL_ARGS = --prefix '$(PREFIX)' --destdir '$(DESTDIR)' --sbindir '$(SBINDIR)' \
	--bindir '$(BINDIR)' --mandir '$(MANDIR)' --sysconfdir '$(SYSCONFDIR)'

install:
	$(PYTHON) -m pymta.install $(INSTALL_ARGS) $(if $(INSTALL_PYTHON),--python '$(INSTALL_PYTHON)')

uninstall:
	$(PYTHON) -m pymta.install --uninstall $(INSTALL_ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache
