#!/usr/bin/env bash
# Makes target/sdk-venv: a Python venv with the pinned Sprites SDK
# (tests/sdk/requirements.txt), which the API tests run. Idempotent: an
# existing venv with the same requirements is kept.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=target/sdk-venv
stamp="$venv/.requirements"
if [ -x "$venv/bin/python" ] && cmp -s tests/sdk/requirements.txt "$stamp"; then
    exit 0
fi
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check -r tests/sdk/requirements.txt
cp tests/sdk/requirements.txt "$stamp"
