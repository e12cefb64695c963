#!/usr/bin/env bash
# Install what is missing, then run the whole test suite (unit, integration
# on real runsc, protocol over real stdio). Extra arguments go to pytest.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$here/scripts/setup.sh"
cd "$here"
exec "$here/.venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
