#!/bin/sh
# The test suite starts its own throwaway PostgreSQL server (tests/support/postgres.py) and
# needs PostgreSQL's initdb, pg_ctl and psql. Install them when missing, so the PostgreSQL
# tests run instead of failing: Debian's `postgresql` package (version 15 on Debian 12).
# Idempotent: does nothing when the tools are already there.
set -eu

have_tools() {
    for dir in "${LTXBOT_PG_BINDIR:-}" "$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/x)")" \
        /usr/lib/postgresql/*/bin; do
        if [ -n "$dir" ] && [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && [ -x "$dir/psql" ]; then
            return 0
        fi
    done
    return 1
}

if have_tools; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "PostgreSQL's initdb/pg_ctl are missing and this is not a Debian-like system:" >&2
    echo "install PostgreSQL 15 (its server binaries) or set LTXBOT_PG_BINDIR to their directory." >&2
    exit 1
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "PostgreSQL's initdb/pg_ctl are missing; as root, run: apt-get install postgresql" >&2
    exit 1
fi
echo "installing PostgreSQL for the tests (apt-get install postgresql)"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null
have_tools || { echo "postgresql was installed but initdb/pg_ctl/psql are still not found" >&2; exit 1; }
