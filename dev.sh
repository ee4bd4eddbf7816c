#!/usr/bin/env bash
# One entry point for a fresh Debian/Ubuntu machine (run as root, or with sudo):
#   ./dev.sh demo    set up, then run the daemon on the built-in demo model and call it once
#   ./dev.sh test    set up, then run the whole test suite (what CI runs)
#   ./dev.sh bench   set up, then run the benchmarks
#   ./dev.sh setup   only the set-up (idempotent)
# Set-up: Debian's bubblewrap, libseccomp2, OpenBLAS and Python venv packages; the
# unprivileged worker user; a virtualenv at $SEALBOX_VENV made from Debian's
# /usr/bin/python3 (a Python the worker user can execute), with sealbox and its
# test dependencies and the mlx-lm engine's extra installed into it.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${SEALBOX_VENV:-/opt/sealbox/venv}
WORKER_USER=sealbox-worker

need_root() {
  if [ "$(id -u)" != 0 ]; then echo "dev.sh: run as root (sudo ./dev.sh $1): the daemon drops each worker to $WORKER_USER" >&2; exit 2; fi
}

setup() {
  need_root "$1"
  local pkgs=(bubblewrap libseccomp2 python3-venv python3-dev libopenblas0-pthread)
  local missing=()
  for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  # The unit file's test runs `systemd-analyze verify`; the alert rules' test reads YAML.
  command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
  dpkg -s python3-yaml >/dev/null 2>&1 || missing+=(python3-yaml)
  # The transfer tests serve signed models over HTTPS from a real nginx on loopback; the benchmark compares with curl.
  command -v nginx >/dev/null 2>&1 || missing+=(nginx-light)
  command -v curl >/dev/null 2>&1 || missing+=(curl)
  # ... and OCI artifacts from a real registry (distribution 2.8) on loopback.
  command -v docker-registry >/dev/null 2>&1 || missing+=(docker-registry)
  # ... and over SFTP from a real sshd.
  [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "dev.sh: installing ${missing[*]}" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  id "$WORKER_USER" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "$WORKER_USER"
  # The fetch helper's own uid (sealbox.transfer: the HTTPS client runs sandboxed as this user).
  id sealbox-fetch >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin sealbox-fetch
  if [ ! -x "$VENV/bin/python" ]; then
    mkdir -p "$(dirname "$VENV")"
    /usr/bin/python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
  fi
  # Non-editable install: the worker user sees only the venv, never this checkout.
  "$VENV/bin/pip" install -q --disable-pip-version-check ".[test,fetch,llm]"
}

case "${1:-}" in
  setup) setup setup ;;
  demo) setup demo; shift; exec "$VENV/bin/sealbox" demo "$@" ;;
  test) setup test; shift; exec "$VENV/bin/python" -m pytest "$@" ;;
  bench) setup bench; shift; exec "$VENV/bin/python" -m benchmarks.run "$@" ;;
  *) sed -n '2,11p' "$0" >&2; exit 2 ;;
esac
