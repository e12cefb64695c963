#!/usr/bin/env bash
# Install what is missing (runsc from bookworm-backports, .venv), then serve
# MCP on stdio. Setup messages go to stderr: stdout is the MCP channel.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$here/scripts/setup.sh" >&2
exec "$here/.venv/bin/gvisor-mcp" serve "$@"
