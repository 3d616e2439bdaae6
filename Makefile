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

.PHONY: all venv compile run dev-setup test man check-man bench install uninstall clean

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

# The development instance: everything under ./var, SMTP on 127.0.0.1:2525.
dev-setup: venv
	mkdir -p var/log
	$(PY) -m pymta.devsetup $(DEVCONF)

run: dev-setup compile
	@echo "pymta: SMTP on 127.0.0.1:2525, queue in var/spool, mailboxes in var/mail (Ctrl-C stops)"
	$(PY) bin/sendmail -C $(DEVCONF) -bD -q1m

test: venv
	$(PY) -m pytest -q -n 2 --timeout 600 -p no:cacheprovider $(PYTEST_ARGS) tests

man: check-man
check-man:
	$(PYTHON) tests/check_man.py man

bench: venv compile
	$(PY) bench/run.py

install: venv
	$(PY) -m pymta.install --prefix '$(PREFIX)' --destdir '$(DESTDIR)' \
	    --sbindir '$(SBINDIR)' --bindir '$(BINDIR)' --mandir '$(MANDIR)' --sysconfdir '$(SYSCONFDIR)'

uninstall: venv
	$(PY) -m pymta.install --uninstall --prefix '$(PREFIX)' --destdir '$(DESTDIR)' \
	    --sbindir '$(SBINDIR)' --bindir '$(BINDIR)' --mandir '$(MANDIR)' --sysconfdir '$(SYSCONFDIR)'

clean:
	rm -rf build dist *.egg-info .pytest_cache
