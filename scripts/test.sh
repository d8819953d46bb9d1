#!/usr/bin/env bash
# Runs the whole test suite; sets up .venv on first run.
source "$(dirname "$0")/_bootstrap.sh"
bootstrap "testing"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest tests "$@"
