"""Who may do what: an optional admin key, and a bearer token per session.

With ``OPTSERVE_API_KEY`` unset, auth is off (the local default). With it set:

- creating, listing and importing sessions needs ``Authorization: Bearer <admin key>``;
- everything on a session needs that session's token (returned once, at creation) or the admin key;
- a missing token answers 401, a wrong one 403.

Only a SHA-256 digest of a session token is kept (in memory and in snapshots), tokens are compared in constant
time, and neither tokens nor the key are logged or listed.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from .errors import Forbidden, SessionNotFound, Unauthorized
from .headers import HeaderMap


def new_token() -> tuple[str, str]:
    """(token to give the client once, the digest to keep)."""
    token = secrets.token_urlsafe(32)
    return token, digest(token)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def bearer(headers: HeaderMap) -> str | None:
    value = headers.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("use Authorization: Bearer <token>")
    return token.strip()


@dataclass(frozen=True)
class Access:
    """What a request may open: everything (auth off, or the admin key) or the sessions whose token it shows.

    The store checks it against the session it finds, so a request is authorized where the session lives (one
    lookup, also on a cluster), and a session's absence is told only to the admin: anyone else learns nothing."""

    admin: bool
    digest: str = ""

    def open(self, session_id: str, token_digest: str | None) -> None:
        """Allow this request on the session (whose token has ``token_digest``), or raise 403."""
        if self.admin or (token_digest is not None and hmac.compare_digest(self.digest, token_digest)):
            return
        raise Forbidden("this token does not open this session")

    def missing(self, session_id: str) -> SessionNotFound | Forbidden:
        """The error for a session that does not exist: 404 for the admin, 403 for anyone else (no probing)."""
        if self.admin:
            return SessionNotFound(f"no session {session_id!r}")
        return Forbidden("this token does not open this session")


ADMIN = Access(admin=True)


class Guard:
    """The auth checks of one app (no checks when ``api_key`` is None)."""

    def __init__(self, api_key: str | None) -> None:
        self.enabled = api_key is not None
        self._key_digest = digest(api_key) if api_key is not None else ""

    def _is_admin(self, token: str) -> bool:
        return hmac.compare_digest(digest(token), self._key_digest)

    def admin(self, headers: HeaderMap) -> None:
        """Require the admin key."""
        if not self.enabled:
            return
        token = bearer(headers)
        if token is None:
            raise Unauthorized("this server requires Authorization: Bearer <admin key>")
        if not self._is_admin(token):
            raise Forbidden("this operation needs the admin key")

    def access(self, headers: HeaderMap) -> Access:
        """What the request's bearer token opens (401 without one when auth is on)."""
        if not self.enabled:
            return ADMIN
        token = bearer(headers)
        if token is None:
            raise Unauthorized("this session requires Authorization: Bearer <session token>")
        presented = digest(token)
        if hmac.compare_digest(presented, self._key_digest):
            return ADMIN
        return Access(admin=False, digest=presented)

    def session(self, headers: HeaderMap, token_digest: str | None) -> None:
        """Require the session's token (or the admin key)."""
        if not self.enabled:
            return
        token = bearer(headers)
        if token is None:
            raise Unauthorized("this session requires Authorization: Bearer <session token>")
        presented = digest(token)
        if token_digest is not None and hmac.compare_digest(presented, token_digest):
            return
        if hmac.compare_digest(presented, self._key_digest):
            return
        raise Forbidden("this token does not open this session")
