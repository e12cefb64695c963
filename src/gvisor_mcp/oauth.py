"""OAuth 2.1 resource-server mode: JWT access tokens from one operator-configured issuer.

Why: hosted clients (Claude's custom connectors) speak OAuth only; a static
bearer header cannot be configured there. This server is a *resource
server*: it never issues tokens, runs no login page and registers no
clients. The operator's authorization server (any OIDC provider) does; we

- validate each JWT access token's signature against the issuer's JWKS,
  and its `iss`, `aud`, `exp` (and `nbf`), with PyJWT (maintained, and
  already required by the MCP SDK, so no new code enters the process);
- take the tenant from a configured claim (default `tenant`); it must name a
  policy tenant like a static token's (the Gateway checks that);
- serve RFC 9728 protected-resource metadata at
  `/.well-known/oauth-protected-resource/mcp` (the SDK's own route), and
  point to it from every 401's `WWW-Authenticate: ... resource_metadata=`,
  so a client discovers the issuer by itself.

Only asymmetric algorithms are accepted (never `none` or HMAC: an HMAC key
in a JWKS would be a shared secret). The JWKS is fetched when first needed,
kept for JWKS_TTL, and fetched again at most every JWKS_MIN_REFRESH seconds
when a token names a key id it does not hold (key rotation). It must be
https, or http on loopback (tests, a local issuer).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import anyio
import structlog

from .errors import Refusal

log = structlog.get_logger("gvisor_mcp.oauth")

ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
JWKS_TTL = 600.0
JWKS_MIN_REFRESH = 30.0
JWKS_TIMEOUT = 5.0
JWKS_RETRY = 5.0
JWKS_MAX_BYTES = 1 << 20
LEEWAY = 30
"""Seconds of clock skew allowed on exp/nbf/iat."""


class TokenRefused(Refusal):
    """Why a bearer token is not accepted, in words for the client (a 401's reason).

    Answered by the HTTP gateway before any tool, so it never reaches
    tools/refuse.py; it is a refusal all the same (the client can fix it)."""

    kind = "auth"


@dataclass(frozen=True)
class OAuthOptions:
    issuer: str
    jwks_url: str
    resource: str
    """This server's MCP endpoint URL as clients reach it (RFC 9728 `resource`)."""
    audience: str = ""
    """Expected `aud`; default: `resource`."""
    tenant_claim: str = "tenant"
    scopes: tuple[str, ...] = ()
    """Scopes every token must carry (and advertised in the metadata)."""

    @property
    def expected_audience(self) -> str:
        return self.audience or self.resource

    def check(self) -> None:
        for flag, url in (("--oauth-issuer", self.issuer), ("--oauth-resource", self.resource)):
            if urlparse(url).scheme not in ("https", "http") or not urlparse(url).netloc:
                raise ValueError(f"{flag} {url!r} is not an http(s) URL")
        jwks = urlparse(self.jwks_url)
        if not (jwks.scheme == "https" or (jwks.scheme == "http" and _loopback(jwks.hostname or ""))):
            raise ValueError(
                f"--oauth-jwks-url {self.jwks_url!r} must be https (or http on loopback): the keys that "
                "sign access tokens must not be fetched in clear text"
            )
        if not self.tenant_claim:
            raise ValueError("--oauth-tenant-claim must name a claim, like `tenant`")

    def settings(self) -> Any:
        """The SDK's AuthSettings for this resource server (it keeps a path-less
        issuer exact: RFC 8414 compares issuers as strings). The JWT verifier
        checks the audience itself (`validate_token_resource=False`): a JWT's
        `aud` may be an operator-chosen name rather than this URL."""
        from mcp.server.auth.settings import AuthSettings

        return AuthSettings(
            issuer_url=self.issuer,
            resource_server_url=self.resource,
            required_scopes=list(self.scopes) or None,
            validate_token_resource=False,
        )

    def metadata_url(self) -> str:
        from mcp.server.auth.routes import build_resource_metadata_url

        return str(build_resource_metadata_url(self.settings().resource_server_url))

    def metadata_app(self) -> Any:
        """The SDK's RFC 9728 route(s), as an ASGI app the Gateway serves without a token."""
        from mcp.server.auth.routes import create_protected_resource_routes
        from starlette.applications import Starlette

        settings = self.settings()
        routes = create_protected_resource_routes(
            resource_url=settings.resource_server_url,
            authorization_servers=[settings.issuer_url],
            scopes_supported=settings.required_scopes,
            resource_name="gvisor-mcp",
        )
        return Starlette(routes=routes)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`serve --transport http` flags for OAuth resource-server mode."""
    p.add_argument(
        "--oauth-issuer",
        default=None,
        metavar="URL",
        help="http: accept JWT access tokens from this OAuth issuer (exact `iss`); static tokens keep working",
    )
    p.add_argument(
        "--oauth-jwks-url",
        default=None,
        metavar="URL",
        help="http: the issuer's JWKS (its `jwks_uri`); required with --oauth-issuer",
    )
    p.add_argument(
        "--oauth-resource",
        default=None,
        metavar="URL",
        help="http: this server's MCP URL as clients reach it, e.g. https://mcp.example/mcp "
        "(default on loopback: http://127.0.0.1:PORT/mcp)",
    )
    p.add_argument(
        "--oauth-audience", default=None, help="http: the `aud` tokens must carry (default: --oauth-resource)"
    )
    p.add_argument(
        "--oauth-tenant-claim",
        default="tenant",
        metavar="CLAIM",
        help="http: the claim that names the policy tenant (default `tenant`)",
    )
    p.add_argument(
        "--oauth-scope",
        action="append",
        default=[],
        metavar="SCOPE",
        help="http: a scope every token must carry (repeatable)",
    )


def options_from_args(args: Any, *, scheme: str, host: str, port: int) -> OAuthOptions | None:
    """OAuthOptions from the flags, or None when --oauth-issuer is not given; ValueError when incomplete."""
    issuer = getattr(args, "oauth_issuer", None)
    if not issuer:
        for flag in ("oauth_jwks_url", "oauth_resource", "oauth_audience"):
            if getattr(args, flag, None):
                raise ValueError(f"--{flag.replace('_', '-')} needs --oauth-issuer")
        return None
    if not args.oauth_jwks_url:
        raise ValueError("--oauth-issuer needs --oauth-jwks-url (the issuer's `jwks_uri`)")
    resource = args.oauth_resource
    if not resource:
        if not _loopback(host):
            raise ValueError(
                "--oauth-issuer needs --oauth-resource URL (this server's public MCP URL) when not bound to loopback"
            )
        resource = f"{scheme}://127.0.0.1:{port}/mcp"
    options = OAuthOptions(
        issuer=issuer,
        jwks_url=args.oauth_jwks_url,
        resource=resource,
        audience=args.oauth_audience or "",
        tenant_claim=args.oauth_tenant_claim,
        scopes=tuple(args.oauth_scope),
    )
    options.check()
    return options


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2


class JwtVerifier:
    """Checks JWT access tokens against OAuthOptions; returns (tenant, claims)."""

    def __init__(self, options: OAuthOptions) -> None:
        self.options = options
        self._keys: dict[str, Any] = {}
        self._fetched_at = -1e9
        self._failure: TokenRefused | None = None
        self._lock = anyio.Lock()

    async def check(self, token: str) -> tuple[str, dict[str, Any]]:
        import jwt

        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as e:
            raise TokenRefused(f"the bearer token is not a well-formed JWT ({_short(e)})") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise TokenRefused(f"JWT algorithm {alg!r} is not accepted; accepted: {', '.join(ALGORITHMS)}")
        key = await self._key(header.get("kid"))
        o = self.options
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=o.expected_audience,
                issuer=o.issuer,
                leeway=LEEWAY,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenRefused(
                f"the access token expired at {_when(_claim(token, 'exp'))}; get a new one from {o.issuer}"
            ) from None
        except jwt.InvalidAudienceError:
            raise TokenRefused(
                f"the access token is for audience {_claim(token, 'aud')!r}, not this server "
                f"({o.expected_audience!r}); request a token for that resource"
            ) from None
        except jwt.InvalidIssuerError:
            raise TokenRefused(
                f"the access token was issued by {_claim(token, 'iss')!r}; this server accepts "
                f"tokens from {o.issuer!r} only"
            ) from None
        except jwt.MissingRequiredClaimError as e:
            raise TokenRefused(f"the access token has no `{e.claim}` claim; it must have exp, iss and aud") from None
        except jwt.InvalidSignatureError:
            raise TokenRefused(f"the access token's signature does not verify with {o.issuer}'s keys") from None
        except jwt.PyJWTError as e:
            raise TokenRefused(f"the access token is not valid: {_short(e)}") from None
        except (TypeError, ValueError):  # PyJWT: the header's alg does not fit the key's type
            raise TokenRefused(
                f"the access token's algorithm {alg} does not match its key "
                f"({header.get('kid')!r}) in {o.issuer}'s JWKS"
            ) from None
        tenant = claims.get(o.tenant_claim)
        if not isinstance(tenant, str) or not tenant or tenant.startswith("@"):
            raise TokenRefused(
                f"the access token has no `{o.tenant_claim}` claim naming a tenant; ask the "
                f"operator of {o.issuer} to add it"
            )
        granted = scopes_of(claims)
        missing = [s for s in o.scopes if s not in granted]
        if missing:
            raise TokenRefused(f"the access token lacks scope(s) {' '.join(missing)}; request them from {o.issuer}")
        return tenant, claims

    async def _key(self, kid: str | None) -> Any:
        keys = await self._jwks(refresh=False)
        key = self._pick(keys, kid)
        if key is None and time.monotonic() - self._fetched_at >= JWKS_MIN_REFRESH:
            key = self._pick(await self._jwks(refresh=True), kid)  # the issuer may have rotated its keys
        if key is None:
            raise TokenRefused(f"the access token's key id {kid!r} is not in {self.options.issuer}'s JWKS")
        return key

    @staticmethod
    def _pick(keys: dict[str, Any], kid: str | None) -> Any:
        if kid is not None:
            return keys.get(kid)
        return next(iter(keys.values())) if len(keys) == 1 else None

    async def _jwks(self, *, refresh: bool) -> dict[str, Any]:
        """The issuer's keys: cached for JWKS_TTL; on `refresh` (an unknown key
        id) fetched again unless fetched within JWKS_MIN_REFRESH. A failed fetch
        keeps the old keys, and is not retried for JWKS_RETRY seconds."""
        async with self._lock:
            age = time.monotonic() - self._fetched_at
            if self._failure is not None and age < JWKS_RETRY:
                if not self._keys:
                    raise self._failure
                return self._keys
            if self._keys and age < (JWKS_MIN_REFRESH if refresh else JWKS_TTL):
                return self._keys
            self._fetched_at = time.monotonic()
            try:
                self._keys = await _fetch_jwks(self.options.jwks_url)
                self._failure = None
            except TokenRefused as e:
                self._failure = e
                if not self._keys:
                    raise
                log.warning("jwks_refresh_failed_keeping_old_keys", url=self.options.jwks_url)
            return self._keys


async def _fetch_jwks(url: str) -> dict[str, Any]:
    import httpx2
    import jwt

    try:
        async with httpx2.AsyncClient(timeout=JWKS_TIMEOUT, follow_redirects=False) as http:
            r = await http.get(url, headers={"Accept": "application/json"})
        if r.status_code != 200:
            raise ValueError(f"HTTP {r.status_code}")
        if len(r.content) > JWKS_MAX_BYTES:
            raise ValueError(f"larger than {JWKS_MAX_BYTES} bytes")
        keyset = jwt.PyJWKSet.from_dict(json.loads(r.content))
    except (httpx2.HTTPError, ValueError, jwt.PyJWTError) as e:
        log.error("jwks_fetch_failed", url=url, error=_short(e))
        raise TokenRefused(
            f"this server cannot fetch its issuer's keys right now ({_short(e)}); try again later, or tell the operator"
        ) from None
    keys: dict[str, Any] = {}
    for i, k in enumerate(keyset.keys):
        if k.algorithm_name in ALGORITHMS or k.key_type in ("RSA", "EC", "OKP"):
            keys[k.key_id or f"#{i}"] = k.key
    log.info("jwks_fetched", url=url, keys=len(keys))
    return keys


def scopes_of(claims: dict[str, Any]) -> list[str]:
    raw = claims.get("scope", claims.get("scp", ""))
    return raw.split() if isinstance(raw, str) else [str(s) for s in raw] if isinstance(raw, list) else []


def _claim(token: str, name: str) -> Any:
    import jwt

    try:
        return jwt.decode(token, options={"verify_signature": False}).get(name)
    except jwt.PyJWTError:
        return None


def _when(exp: Any) -> str:
    try:
        return dt.datetime.fromtimestamp(int(exp), dt.UTC).isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError):
        return "an unknown time"


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:200]
