#!/usr/bin/env bash
# Prints the path of a uv binary for this project, installing a pinned one if needed.
# uv is installed from PyPI into a venv of the project's own (.paceline/tools), so nothing
# a person installed by hand is assumed and the system Python is left untouched.
set -euo pipefail
UV_VERSION=0.13.9
root=$(cd "$(dirname "$0")/.." && pwd)
tools="$root/.paceline/tools"
uv="$tools/bin/uv"
if [ -x "$uv" ] && "$uv" --version 2>/dev/null | grep -q "uv $UV_VERSION"; then
  echo "$uv"; exit 0
fi
if ! command -v python3 >/dev/null; then
  echo "ensure-uv: python3 is missing; as root on Debian: apt-get install python3 python3-venv" >&2
  exit 1
fi
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "ensure-uv: Python 3.11 or newer is needed, found $(python3 --version)" >&2
  exit 1
fi
if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "ensure-uv: installing python3-venv" >&2
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2
  else
    echo "ensure-uv: Python's venv module is missing; as root on Debian: apt-get install python3-venv" >&2
    exit 1
  fi
fi
echo "ensure-uv: installing uv $UV_VERSION into $tools" >&2
rm -rf "$tools"
python3 -m venv "$tools" >&2
"$tools/bin/pip" install --quiet --disable-pip-version-check "uv==$UV_VERSION" >&2
echo "$uv"
