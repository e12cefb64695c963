#!/usr/bin/env bash
# Install what is missing, lint and type-check, then run the whole test suite
# (unit, fast, integration on real runsc, protocol over real stdio). Extra
# arguments go to pytest. A ruff (lint or format) or mypy finding fails the run before the
# tests start (configured in pyproject.toml; `.ci/run` calls this script).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$here/scripts/setup.sh"
cd "$here"
"$here/.venv/bin/ruff" check --quiet .
"$here/.venv/bin/ruff" format --check --quiet . || { echo "ruff format: run .venv/bin/ruff format . (the files above are not formatted)" >&2; exit 1; }
"$here/.venv/bin/mypy"
# --durations: the slowest tests are named in every CI log (the suite must stay under 30 min).
exec "$here/.venv/bin/python" -m pytest -q -p no:cacheprovider --durations=15 "$@"
