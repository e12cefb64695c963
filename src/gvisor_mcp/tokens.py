"""Bearer tokens for the HTTP transport: a file of token hashes -> tenant names.

Only SHA-256 hashes are stored (tokens are 256-bit random strings, so a
plain hash is enough: there is nothing to brute-force). `gvisor-mcp token
add TENANT` prints a new token once. Lookup compares the presented token's
hash against every entry with `hmac.compare_digest`, so its time does not
depend on which entry (if any) matches.

The role `@metrics` is not a tenant: its tokens may read /metrics and
nothing else; tenant tokens may not read /metrics.

`token list` shows each entry's fingerprint: the first 12 hex digits of the
stored hash (never the token, which is not stored). `token revoke` removes
entries by fingerprint or tenant; a running server sees the file change on
its next request (auth.py), so a revoked token is refused from then on.
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

from .errors import ConfigurationError

log = structlog.get_logger("gvisor_mcp.tokens")

TOKEN_PREFIX = "gmcp_"
METRICS_ROLE = "@metrics"
HEADER = "# gvisor-mcp tokens: SHA-256 of each token -> tenant. Add with `gvisor-mcp token add TENANT`.\n"


class TokenFileError(ConfigurationError, ValueError):
    """A tokens file that cannot be used; the operator reads it."""


FINGERPRINT_LEN = 12
"""Hex digits of the stored hash shown by `token list` (48 bits: unique in any real file)."""


@dataclass(frozen=True)
class Entry:
    sha256: str
    tenant: str
    created: str

    @property
    def fingerprint(self) -> str:
        return self.sha256[:FINGERPRINT_LEN]


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class TokenFile:
    def __init__(self, path: Path, entries: tuple[Entry, ...] = ()) -> None:
        self.path = path
        self.entries = entries

    @classmethod
    def load(cls, path: str | Path) -> TokenFile:
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return cls(path)
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise TokenFileError(
                f"cannot read the tokens file {path}: {reason}. Run as a user who can read it "
                "(it is written mode 0600 by `gvisor-mcp token add`), or pass another with --tokens"
            ) from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise TokenFileError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
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
                raise TokenFileError(f"{path}: tokens[{i}] must have `sha256` (64 hex digits) and `tenant` (a name)")
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
        entry = self.entry_for(token)
        return entry.tenant if entry is not None else None

    def entry_for(self, token: str | None) -> Entry | None:
        """The entry of `token`, or None; constant time in the match, like tenant_for."""
        if not token:
            return None
        presented = _hash(token)
        found: Entry | None = None
        for entry in self.entries:
            if hmac.compare_digest(entry.sha256, presented):
                found = entry
        return found

    def revoke(self, fingerprint: str | None = None, tenant: str | None = None) -> tuple[Entry, ...]:
        """Remove the entries whose fingerprint starts with `fingerprint` (at
        least 6 hex digits, matching one entry) or all of `tenant`'s; return them.

        Raises TokenFileError, naming what exists, when nothing or (for a
        fingerprint) more than one entry matches; nothing is written then.
        """
        if (fingerprint is None) == (tenant is None):
            raise TokenFileError("give a FINGERPRINT (from `gvisor-mcp token list`) or --tenant TENANT")
        if fingerprint is not None:
            prefix = fingerprint.strip().lower()
            if len(prefix) < 6 or any(c not in "0123456789abcdef" for c in prefix):
                raise TokenFileError(
                    f"{fingerprint!r} is not a fingerprint: give at least 6 hex digits as shown by "
                    "`gvisor-mcp token list`"
                )
            gone = tuple(e for e in self.entries if e.sha256.startswith(prefix))
            if len(gone) > 1:
                raise TokenFileError(
                    f"fingerprint {prefix} matches {len(gone)} tokens "
                    f"({', '.join(e.fingerprint for e in gone)}); give more digits"
                )
            what = f"fingerprint {prefix}"
        else:
            gone = tuple(e for e in self.entries if e.tenant == tenant)
            what = f"tenant {tenant!r}"
        if not gone:
            raise TokenFileError(f"no token in {self.path} has {what}; `gvisor-mcp token list` shows the tokens there")
        self.entries = tuple(e for e in self.entries if e not in gone)
        self._write()
        return gone

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
