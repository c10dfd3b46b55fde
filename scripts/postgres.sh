#!/usr/bin/env bash
# Idempotent: install (if missing) and start a local PostgreSQL listening on loopback only, with a
# role and database for the multi-worker storage test:
#   postgresql://crabsweep:crabsweep@127.0.0.1:5432/crabsweep_test
# Needs root (CI runs as root). Without root or apt it says so and the PostgreSQL test reports why.
set -uo pipefail
if [ "$(id -u)" != 0 ]; then echo "postgres.sh: not root; skipping the PostgreSQL set-up" >&2; exit 0; fi
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
    || { echo "postgres.sh: could not install postgresql" >&2; exit 0; }
fi
ver=$(ls /usr/lib/postgresql | sort -n | tail -1)
pg_lsclusters -h 2>/dev/null | grep -q "^$ver main" || pg_createcluster "$ver" main >/dev/null
conf="/etc/postgresql/$ver/main/postgresql.conf"
grep -q "^listen_addresses = '127.0.0.1'" "$conf" || echo "listen_addresses = '127.0.0.1'" >> "$conf"
pg_lsclusters -h | grep "^$ver main" | grep -q online || pg_ctlcluster "$ver" main start
as_pg() { su postgres -c "psql -qtAX -c \"$1\""; }
[ "$(as_pg "SELECT 1 FROM pg_roles WHERE rolname='crabsweep'")" = 1 ] \
  || as_pg "CREATE ROLE crabsweep LOGIN PASSWORD 'crabsweep'"
[ "$(as_pg "SELECT 1 FROM pg_database WHERE datname='crabsweep_test'")" = 1 ] \
  || as_pg "CREATE DATABASE crabsweep_test OWNER crabsweep"
echo "postgres.sh: postgresql://crabsweep:crabsweep@127.0.0.1:5432/crabsweep_test ready" >&2
