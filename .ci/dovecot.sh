#!/usr/bin/env bash
# Dovecot for the `imap` tests: make sure the Debian package is there, then prove a private instance starts.
# The tests start their own Dovecot (tests/dovecot.py: config, sockets, maildirs and logs in a temp folder,
# 127.0.0.1 on a free port); nothing here configures or starts the system service.
#   Needs: dovecot-imapd (pulls in dovecot-core, which creates the `dovecot` and `dovenull` users and
#   depends on openssl, used for the TLS tests' throwaway certificate).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x /usr/sbin/dovecot ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "dovecot missing: apt-get install dovecot-imapd (as root)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  # Package scripts must not start the system Dovecot on ports 143/993.
  [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; }
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends dovecot-imapd openssl >/dev/null
fi

PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
"$PY" - <<'PYEOF'
from tests.dovecot import Dovecot, dovecot_available
reason = dovecot_available()
if reason:
    raise SystemExit(f"dovecot not usable: {reason}")
with Dovecot({"ci": "ci-pw"}) as server:
    server.append("ci", [b"Subject: ci\r\nMessage-ID: <ci@example.test>\r\n\r\nhello\r\n"])
    assert server.uids("ci") == [1], server.log()
    print(f"dovecot OK: private instance on 127.0.0.1:{server.port}")
PYEOF
