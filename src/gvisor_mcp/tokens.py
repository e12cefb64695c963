"""Bearer tokens for the HTTP transport: a file of token hashes -> tenant names.

Only SHA-256 hashes are stored (tokens are 256-bit random strings, so a
plain hash is enough: there is nothing to brute-force). `gvisor-mcp token
add TENANT` prints a new token once. Lookup compares the presented token's
hash against every entry with `hmac.compare_digest`, so its time does not
depend on which entry (if any) matches.

The role `@metrics` is not a tenant: its tokens may read /metrics and
nothing else; tenant tokens may not read /metrics.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import structlog
import yaml

log = structlog.get_logger("gvisor_mcp.tokens")

TOKEN_PREFIX = "gmcp_"
METRICS_ROLE = "@metrics"
HEADER = "# gvisor-mcp tokens: SHA-256 of each token -> tenant. Add with `gvisor-mcp token add TENANT`.\n"


class TokenFileError(ValueError):
    pass


@dataclass(frozen=True)
class Entry:
    sha256: str
    tenant: str
    created: str


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class TokenFile:
    def __init__(self, path: Path, entries: tuple[Entry, ...] = ()) -> None:
        self.path = path
        self.entries = entries

    @classmethod
    def load(cls, path: str | Path) -> TokenFile:
        path = Path(path)
        if not path.exists():
            return cls(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise TokenFileError(f"{path}: not valid YAML: {e}") from None
        rows = data.get("tokens") if isinstance(data, dict) else None
        if not isinstance(rows, list):
            raise TokenFileError(f"{path}: expected a mapping with a `tokens:` list")
        entries = []
        for i, row in enumerate(rows):
            if (
                not isinstance(row, dict)
                or not isinstance(row.get("sha256"), str)
                or len(row["sha256"]) != 64
                or not isinstance(row.get("tenant"), str)
            ):
                raise TokenFileError(
                    f"{path}: tokens[{i}] must have `sha256` (64 hex digits) and `tenant` (a name)"
                )
            entries.append(Entry(row["sha256"].lower(), row["tenant"], str(row.get("created", ""))))
        return cls(path, tuple(entries))

    def reload(self) -> TokenFile:
        """SIGHUP: the file as it is now; this one, unchanged, when the new file
        is broken (logged: the server keeps serving the tokens it had)."""
        try:
            fresh = TokenFile.load(self.path)
        except (ValueError, OSError) as e:  # TokenFileError, undecodable bytes, unreadable
            log.error("tokens_reload_failed", path=str(self.path), error=str(e))
            return self
        log.info("tokens_reloaded", count=len(fresh.entries))
        return fresh

    def tenant_for(self, token: str | None) -> str | None:
        """The tenant (or METRICS_ROLE) of `token`, or None; constant time in the match."""
        if not token:
            return None
        presented = _hash(token)
        found: str | None = None
        for entry in self.entries:
            if hmac.compare_digest(entry.sha256, presented):
                found = entry.tenant
        return found

    def add(self, tenant: str) -> str:
        """A new token for `tenant`; only its hash is written (file mode 0600)."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        entry = Entry(_hash(token), tenant, dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
        self.entries = (*self.entries, entry)
        self._write()
        return token

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = yaml.safe_dump(
            {"tokens": [{"sha256": e.sha256, "tenant": e.tenant, "created": e.created} for e in self.entries]},
            sort_keys=False,
        )
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(HEADER + body)
        os.replace(tmp, self.path)
