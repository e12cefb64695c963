"""Who is calling: bearer tokens through the MCP SDK's TokenVerifier and bearer backend.

Two kinds of token, one verifier (`TenantTokenVerifier`, the SDK's
`TokenVerifier` protocol):

- static tokens from the tokens file (`gvisor-mcp token add`), looked up
  by hash. The file is checked (one stat) on every request and read again
  when it changed, so `gvisor-mcp token revoke` takes effect on the next
  request, also inside a session opened with the revoked token (every
  request of a session is authenticated, not only its first);
- JWT access tokens from the operator's OAuth issuer (oauth.py), when
  configured.

The Gateway authenticates each request with the SDK's `BearerAuthBackend`
and puts the SDK's `AuthenticatedUser` in the ASGI scope (`scope["user"]`),
as the SDK's own AuthenticationMiddleware would: the SDK's session manager
then binds each session to the credential's principal (tenant, issuer,
subject) and answers 404 to any other. The AccessToken's `client_id` is the
tenant (or `@metrics`); `subject` is the static token's fingerprint or the
JWT's `sub`.

A refused token gets a 401 whose body says why and how to get a good one
(the SDK's own answer says only "Authentication required"), with a
`WWW-Authenticate` that carries RFC 6750's error and, in OAuth mode, the
RFC 9728 `resource_metadata` pointer.
"""

from __future__ import annotations

import contextvars
import os
from pathlib import Path
from typing import Any

import structlog
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser, BearerAuthBackend
from mcp.server.auth.provider import AccessToken
from starlette.requests import HTTPConnection

from .oauth import JwtVerifier, OAuthOptions, TokenRefused, looks_like_jwt, scopes_of
from .tokens import TOKEN_PREFIX, TokenFile

log = structlog.get_logger("gvisor_mcp.auth")

_refusal: contextvars.ContextVar[str | None] = contextvars.ContextVar("gvisor_mcp_auth_refusal", default=None)


class WatchedTokenFile:
    """The tokens file, read again whenever it changes on disk.

    A file that becomes unreadable or invalid keeps the last good entries
    (and logs why): an operator's typo must not lock every tenant out.
    A file that is removed means no static token is valid.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._stamp = self._stat()
        self.current = TokenFile.load(self.path)  # TokenFileError: the caller says it in one line

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError:
            return (-1, -1, -1)
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def get(self) -> TokenFile:
        stamp = self._stat()
        if stamp != self._stamp:
            self._stamp = stamp
            self.reload()
        return self.current

    def reload(self) -> None:
        """The file as it is now, or the last good one (TokenFile.reload logs which)."""
        self.current = self.current.reload()


class TenantTokenVerifier:
    """The SDK's TokenVerifier for static tokens and (optionally) JWT access tokens."""

    def __init__(self, tokens: WatchedTokenFile, oauth: OAuthOptions | None = None) -> None:
        self.tokens = tokens
        self.oauth = oauth
        self.jwt = JwtVerifier(oauth) if oauth is not None else None

    async def verify_token(self, token: str) -> AccessToken | None:
        token = token.strip()
        if self.jwt is not None and not token.startswith(TOKEN_PREFIX) and looks_like_jwt(token):
            try:
                tenant, claims = await self.jwt.check(token)
            except TokenRefused as e:
                _refusal.set(str(e))
                return None
            except Exception as e:  # never a traceback to the client, never a 500 for a bad token
                log.error("jwt_check_failed", error=f"{type(e).__name__}: {e}"[:300])
                _refusal.set("this server could not check the access token; try again, or tell the operator")
                return None
            return AccessToken(
                token=token,
                client_id=tenant,
                scopes=scopes_of(claims),
                expires_at=_int(claims.get("exp")),
                resource=self.oauth.resource if self.oauth else None,
                subject=_str(claims.get("sub")),
                claims={"iss": claims.get("iss"), "tenant": tenant},
            )
        entry = self.tokens.get().entry_for(token)
        if entry is None:
            _refusal.set("this bearer token is not valid here (unknown, or revoked)")
            return None
        return AccessToken(
            token=token,
            client_id=entry.tenant,
            scopes=[],
            subject=f"token:{entry.fingerprint}",
            resource=self.oauth.resource if self.oauth else None,
            claims={"tenant": entry.tenant},
        )


async def authenticate(verifier: TenantTokenVerifier, scope: dict[str, Any]) -> AuthenticatedUser | str:
    """The request's user, through the SDK's BearerAuthBackend; or why not (a sentence)."""
    refusal = _refusal.set(None)
    try:
        result = await BearerAuthBackend(verifier).authenticate(HTTPConnection(scope))
        if result is not None:
            return result[1]
        if _refusal.get() is not None:
            return _refusal.get() or ""
        header = next((v for k, v in scope.get("headers", ()) if k.lower() == b"authorization"), None)
        if header is not None and header[:7].lower() == b"bearer ":
            # The verifier accepted it, the SDK's backend did not: only past `exp` (within our leeway).
            return "the access token has expired; get a new one"
        if header is not None:
            return "the Authorization header must be `Bearer <token>`"
        return "a bearer token is required: `Authorization: Bearer <token>`"
    finally:
        _refusal.reset(refusal)


def tenant_of(user: AuthenticatedUser) -> str:
    return user.access_token.client_id


def unauthorized_body(reason: str, oauth: OAuthOptions | None) -> tuple[dict[str, Any], list[tuple[bytes, bytes]]]:
    """A 401's JSON body and WWW-Authenticate header (RFC 6750 §3, RFC 9728 §5.1)."""
    how = "the operator creates a static token with `gvisor-mcp token add TENANT`"
    if oauth is not None:
        how += f"; OAuth clients get an access token from {oauth.issuer} (see {oauth.metadata_url()})"
    body = {"error": "unauthorized", "message": f"{reason}; {how}"}
    params = ['realm="gvisor-mcp"']
    presented = not reason.startswith("a bearer token is required")
    if presented:
        params.append('error="invalid_token"')
        params.append(f'error_description="{_quoted(reason)}"')
    if oauth is not None:
        params.append(f'resource_metadata="{oauth.metadata_url()}"')
        if oauth.scopes:
            params.append(f'scope="{" ".join(oauth.scopes)}"')
    return body, [(b"www-authenticate", ("Bearer " + ", ".join(params)).encode())]


def _quoted(text: str) -> str:
    """RFC 6750 error_description: printable ASCII without `"` and `\\`."""
    return "".join(c for c in text if 0x20 <= ord(c) < 0x7F and c not in '"\\')[:300]


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) else None
