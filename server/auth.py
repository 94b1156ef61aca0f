"""Who is calling: credentials, tokens and the identity (company, user) of every request.

A request carries `Authorization: Bearer <token>` (a JWT from `auth.login`, or one the
ClearML apiserver issued when its token secret is configured), HTTP Basic
`access_key:secret_key`, or, without an Authorization header, the token in the web UI's
session cookie. Secrets are stored as scrypt hashes; the slow hash is computed
once per (key, secret) pair and process, while the credential row itself is read on every
Basic request, so a revoked key stops working at once. Bearer tokens are checked with
HS256 alone (microseconds): daemons send one on every status report.
"""

import asyncio
import base64
import binascii
import hashlib
import hmac
import math
import secrets
import string
import time
from dataclasses import dataclass, field

import jwt
from aiohttp import web

from . import errors
from .errors import ApiError
from .keys import IDENTITY, POOL, SETTINGS, SIGNING_KEY
from .storage import credentials, tenants

TOKEN_ALGORITHM = "HS256"
ACCESS_KEY_ALPHABET = string.ascii_uppercase + string.digits
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
VERIFIED_CACHE_LIMIT = 10_000


@dataclass(frozen=True)
class Identity:
    company: str
    user: str
    role: str = "user"
    company_name: str = ""
    user_name: str = ""
    # The token itself when the apiserver issued it: calls made to the apiserver on the
    # caller's behalf carry it (server/apiserver.py). Empty for our own keys and tokens.
    apiserver_token: str = field(default="", repr=False)


# Secrets

def new_access_key() -> str:
    return "".join(secrets.choice(ACCESS_KEY_ALPHABET) for _ in range(20))


def new_secret() -> str:
    return secrets.token_urlsafe(36)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def hash_secret(secret: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_secret(secret: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(
            secret.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p), dklen=len(expected)
        )
    except (ValueError, binascii.Error):
        return False
    return scheme == "scrypt" and hmac.compare_digest(actual, expected)


# Tokens

def issue_token(identity: Identity, key: str, lifetime: int, *, api_version: str, server_version: str) -> str:
    now = int(time.time())
    claims = {
        "identity": {
            "company": identity.company,
            "company_name": identity.company_name,
            "user": identity.user,
            "user_name": identity.user_name,
            "role": identity.role,
        },
        "iat": now,
        "exp": now + lifetime,
        "api_version": api_version,
        "server_version": server_version,
        "feature_set": "basic",
    }
    return jwt.encode(claims, key, algorithm=TOKEN_ALGORITHM)


class _BadSignature(ApiError):
    """A token not signed with the key tried: another key may still verify it."""

    def __init__(self):
        super().__init__(errors.INVALID_TOKEN, "Invalid token: bad signature")


def _claims(token: str, key: str, required: list[str]) -> dict:
    """The claims of an HS256 token signed with `key`, its exp checked when present."""
    try:
        return jwt.decode(token, key, algorithms=[TOKEN_ALGORITHM], options={"require": required})
    except jwt.ExpiredSignatureError:
        raise ApiError(errors.INVALID_TOKEN, "Invalid token: the token has expired") from None
    except jwt.InvalidSignatureError:
        raise _BadSignature() from None
    except jwt.DecodeError:
        raise ApiError(errors.MALFORMED_CREDENTIALS, "Malformed credentials: the token cannot be decoded") from None
    except jwt.InvalidTokenError as error:
        raise ApiError(errors.INVALID_TOKEN, f"Invalid token: {error}") from None


def _identity_claim(claims: dict, required: tuple[str, ...]) -> dict:
    identity = claims.get("identity")
    if not isinstance(identity, dict) or not all(isinstance(identity.get(k), str) and identity[k] for k in required):
        raise ApiError(errors.INVALID_TOKEN, "Invalid token: no identity")
    return identity


def _decode_token(token: str, key: str) -> tuple[Identity, float]:
    claims = _claims(token, key, ["exp", "iat", "identity"])
    identity = _identity_claim(claims, ("company", "user"))
    return Identity(
        company=identity["company"],
        user=identity["user"],
        role=str(identity.get("role", "user")),
        company_name=str(identity.get("company_name", "")),
        user_name=str(identity.get("user_name", "")),
    ), claims["exp"]


def _decode_apiserver_token(token: str, secret: str) -> tuple[Identity, float]:
    """A token of the ClearML apiserver: its identity always has a role; tokens of role
    `system` have no exp (they never expire)."""
    claims = _claims(token, secret, ["identity"])
    identity = _identity_claim(claims, ("company", "user", "role"))
    return Identity(
        company=identity["company"],
        user=identity["user"],
        role=identity["role"],
        company_name=str(identity.get("company_name") or identity["company"]),
        user_name=str(identity.get("user_name") or identity["user"]),
        apiserver_token=token,
    ), claims.get("exp", math.inf)


def _verify(token: str, key: str, apiserver_secret: str) -> tuple[Identity, float, bool]:
    """Our key first, then the apiserver's secret; True when the apiserver issued it. When
    both are the same key, every token is checked as the apiserver's (ours pass too)."""
    if apiserver_secret != key:
        try:
            return *_decode_token(token, key), False
        except _BadSignature:
            if not apiserver_secret:
                raise
    return *_decode_apiserver_token(token, apiserver_secret), True


class _VerifiedTokens:
    """token -> (identity, expiry, from the apiserver) of tokens whose signature was checked
    with the current keys.

    A daemon sends the same token with every report: its signature is checked once per
    process, its expiry on every use.
    """

    def __init__(self):
        self._keys = ("", "")
        self._verified: dict[str, tuple[Identity, float, bool]] = {}

    def identity(self, token: str, key: str, apiserver_secret: str) -> tuple[Identity, bool]:
        if (key, apiserver_secret) != self._keys:
            self._keys, self._verified = (key, apiserver_secret), {}
        known = self._verified.get(token)
        if known is None or known[1] <= time.time():
            known = _verify(token, key, apiserver_secret)
            if len(self._verified) >= VERIFIED_CACHE_LIMIT:
                self._verified.clear()
            self._verified[token] = known
        return known[0], known[2]


_verified_tokens = _VerifiedTokens()


class _EnsuredTenants:
    """(company, user) of apiserver tokens known to exist in the database of `pool`, so that
    a daemon's every report does not pay a write."""

    def __init__(self):
        self._pool = None
        self._known: set[tuple[str, str]] = set()

    async def ensure(self, pool, identity: Identity) -> None:
        if pool is not self._pool:
            self._pool, self._known = pool, set()
        if (identity.company, identity.user) in self._known:
            return
        await tenants.ensure_company(pool, identity.company, identity.company_name)
        await tenants.ensure_user(pool, identity.company, identity.user, identity.user_name, identity.role)
        if len(self._known) >= VERIFIED_CACHE_LIMIT:
            self._known.clear()
        self._known.add((identity.company, identity.user))


_ensured_tenants = _EnsuredTenants()


async def token_identity(request: web.Request, token: str) -> Identity:
    """The identity of a token of ours or, when its secret is configured, of the apiserver's
    (whose company and user are created here on first sight)."""
    identity, from_apiserver = _verified_tokens.identity(
        token, request.app[SIGNING_KEY], request.app[SETTINGS].apiserver_token_secret
    )
    if from_apiserver:
        await _ensured_tenants.ensure(request.app[POOL], identity)
    return identity


# Requests

def _basic_credentials(encoded: str) -> tuple[str, str]:
    try:
        access_key, separator, secret = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise ApiError(errors.MALFORMED_CREDENTIALS, "Malformed credentials: bad Basic encoding") from None
    if not separator or not access_key:
        raise ApiError(errors.MALFORMED_CREDENTIALS, "Malformed credentials: expected access_key:secret_key")
    return access_key, secret


class _VerifiedSecrets:
    """(access key, stored hash) -> a keyed digest of the secret that matched it."""

    def __init__(self):
        self._pepper = secrets.token_bytes(32)
        self._verified: dict[tuple[str, str], bytes] = {}

    def _digest(self, secret: str) -> bytes:
        return hmac.new(self._pepper, secret.encode(), hashlib.sha256).digest()

    async def check(self, access_key: str, secret: str, stored_hash: str) -> bool:
        digest = self._digest(secret)
        known = self._verified.get((access_key, stored_hash))
        if known is not None:
            return hmac.compare_digest(known, digest)
        if not await asyncio.get_running_loop().run_in_executor(None, verify_secret, secret, stored_hash):
            return False
        if len(self._verified) >= VERIFIED_CACHE_LIMIT:
            self._verified.clear()
        self._verified[(access_key, stored_hash)] = digest
        return True


_verified_secrets = _VerifiedSecrets()


async def authenticate_key(pool, access_key: str, secret: str) -> Identity:
    """The identity of an active access key whose secret matches; 401/22 otherwise."""
    row = await credentials.find_active(pool, access_key)
    # Unknown keys are checked against a dummy hash too, so timing does not tell them apart.
    stored_hash = row["secret_hash"] if row else _DUMMY_HASH
    if not await _verified_secrets.check(access_key, secret, stored_hash) or row is None:
        raise ApiError(errors.INVALID_CREDENTIALS, "Invalid credentials: unknown access key or wrong secret")
    return Identity(
        company=row["company"],
        user=row["user_id"],
        role=row["role"],
        company_name=row["company_name"],
        user_name=row["user_name"],
    )


_DUMMY_HASH = hash_secret(new_secret())


async def identify(request: web.Request) -> Identity:
    """The caller, also left on the request as `IDENTITY` (for the access log)."""
    identity = await _identity(request)
    request[IDENTITY] = identity
    return identity


async def _identity(request: web.Request) -> Identity:
    header = request.headers.get("Authorization", "").strip()
    if not header:
        # The web UI sends the apiserver's session cookie instead; a header takes precedence.
        cookie = request.cookies.get(request.app[SETTINGS].token_cookie, "").strip()
        if cookie:
            return await token_identity(request, cookie)
        raise ApiError(errors.MISSING_CREDENTIALS, "Missing credentials: send a Bearer token or Basic credentials")
    scheme, _, value = header.partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return await token_identity(request, value)
    if scheme.lower() == "basic" and value:
        access_key, secret = _basic_credentials(value)
        return await authenticate_key(request.app[POOL], access_key, secret)
    raise ApiError(errors.MALFORMED_CREDENTIALS, "Malformed credentials: expected a Bearer or Basic Authorization header")
