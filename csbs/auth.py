"""API tokens and roles (issue 16): who may call the REST API and the console.

A token is ``csbs_<id>_<secret>``: the id names its catalog row (project, role, name,
expiry), the secret is 32 random bytes in URL-safe base64 and only its SHA-256 is kept,
so the catalog cannot give a token away. A token acts in its project only, with its role:

- ``viewer`` reads;
- ``operator`` also backs up, restores, verifies and replicates;
- ``admin`` also changes policies and quotas, and deletes.

Failed attempts are counted per client; too many in a minute and the client waits
(``LoginLimiter``), so secrets cannot be guessed at speed.

The console signs in with a token once and then holds a session (``Sessions``): a random
secret in an HttpOnly cookie, of which the catalog keeps the hash. A session acts as its
token and ends with it: revoking the token signs its sessions out.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from datetime import datetime, timedelta
from enum import IntEnum

from sqlalchemy import delete as sa_delete
from sqlmodel import col, select

from csbs.catalog import Catalog
from csbs.catalog.rows import ApiTokenRow, ConsoleSessionRow, utcnow
from csbs.errors import CsbsError, InvalidInput, NotFound
from csbs.locks import as_utc
from csbs.model import check_id


class Role(IntEnum):
    """Each role may do what the ones below it may."""

    viewer = 1
    operator = 2
    admin = 3

    @classmethod
    def parse(cls, value: str) -> Role:
        try:
            return cls[value]
        except KeyError:
            raise InvalidInput(
                f"role must be one of viewer, operator, admin (got {value!r})"
            ) from None


class Unauthorized(CsbsError):
    """No token, or one that is unknown, wrong, revoked or expired (HTTP 401)."""


class Forbidden(CsbsError):
    """A valid token whose role may not do this (HTTP 403)."""


class TooManyAttempts(CsbsError):
    """Too many failed attempts from one client: it must wait (HTTP 429)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


_TOKEN = re.compile(r"^csbs_(tok-[0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
_EXPIRES = re.compile(r"^(\d{1,5})([dhm])$")


def parse_expires(value: str | None, now: datetime | None = None) -> datetime | None:
    """``90d``, ``12h`` or ``30m`` from now; None or ``never``: no expiry."""
    if value is None or value == "never":
        return None
    match = _EXPIRES.match(value.strip())
    if match is None or int(match.group(1)) == 0:
        raise InvalidInput(
            f"expires must be a number of days, hours or minutes such as 90d, 12h or 30m, "
            f"or never (got {value!r})"
        )
    unit = {"d": "days", "h": "hours", "m": "minutes"}[match.group(2)]
    return (now or utcnow()) + timedelta(**{unit: int(match.group(1))})


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Tokens:
    """The token rows of the catalog (every project's: a token names its own)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def create(
        self, project: str, role: Role, name: str, expires_at: datetime | None
    ) -> tuple[ApiTokenRow, str]:
        """A new token; returns its row and the token itself (shown once, never again)."""
        check_id(project, "project")
        if not name or len(name) > 255 or any(c in name for c in "\r\n\t"):
            raise InvalidInput("name must be 1-255 characters on one line")
        token_id = f"tok-{secrets.token_hex(8)}"
        secret = secrets.token_urlsafe(32)
        row = ApiTokenRow(
            id=token_id,
            project=project,
            name=name,
            role=role.name,
            secret_hash=_hash(secret),
            created_at=utcnow(),
            expires_at=expires_at,
        )
        with self.catalog.session() as s:
            s.add(row)
        return row, f"csbs_{token_id}_{secret}"

    def list(self, project: str | None = None) -> list[ApiTokenRow]:
        q = select(ApiTokenRow)
        if project is not None:
            q = q.where(ApiTokenRow.project == project)
        with self.catalog.session() as s:
            return list(s.exec(q.order_by(col(ApiTokenRow.created_at))).all())

    def revoke(self, token_id: str, project: str | None = None) -> ApiTokenRow:
        """Revoke a token (it stays listed, revoked); NotFound for another project's."""
        with self.catalog.session() as s:
            row = s.get(ApiTokenRow, token_id)
            if row is None or (project is not None and row.project != project):
                raise NotFound(f"token {token_id} does not exist")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
                s.add(row)
            return row

    def authenticate(self, token: str, now: datetime | None = None) -> ApiTokenRow:
        """The row of a valid token, or Unauthorized (never saying which part was wrong)."""
        now = now or utcnow()
        match = _TOKEN.match(token.strip())
        refused = Unauthorized("a valid API token is required (Authorization: Bearer <token>)")
        if match is None:
            raise refused
        with self.catalog.session() as s:
            row = s.get(ApiTokenRow, match.group(1))
            given = _hash(match.group(2))
            if row is None or not hmac.compare_digest(row.secret_hash, given):
                raise refused
            if row.revoked_at is not None:
                raise Unauthorized(f"token {row.id} was revoked")
            if row.expires_at is not None and as_utc(row.expires_at) <= now:
                raise Unauthorized(
                    f"token {row.id} expired at {as_utc(row.expires_at):%Y-%m-%d %H:%M} UTC"
                )
            last = row.last_used_at
            if last is None or as_utc(last) < now - timedelta(minutes=1):
                row.last_used_at = now  # at most once a minute: reads stay reads
                s.add(row)
            return row


class LoginLimiter:
    """At most ``attempts`` failed attempts per client in ``window`` seconds; then that
    client is refused (429) until the window has passed since its first failure."""

    def __init__(self, attempts: int = 10, window: float = 60.0) -> None:
        self.attempts, self.window = attempts, window
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def check(self, client: str) -> None:
        with self._lock:
            recent = self._recent(client)
            if len(recent) >= self.attempts:
                wait = max(1, int(recent[0] + self.window - time.monotonic()) + 1)
                raise TooManyAttempts(
                    f"too many failed attempts from {client}: try again in {wait} s", wait
                )

    def failed(self, client: str) -> None:
        with self._lock:
            self._recent(client).append(time.monotonic())
            if len(self._failures) > 10_000:  # a flood of addresses: forget the oldest
                for key in list(self._failures)[:5_000]:
                    del self._failures[key]

    def _recent(self, client: str) -> list[float]:
        cutoff = time.monotonic() - self.window
        recent = [t for t in self._failures.get(client, []) if t > cutoff]
        self._failures[client] = recent
        return recent


class Sessions:
    """Console sessions of the catalog (issue 16)."""

    def __init__(self, catalog: Catalog, hours: float = 12.0) -> None:
        self.catalog = catalog
        self.hours = hours

    def open(self, token: ApiTokenRow, now: datetime | None = None) -> tuple[str, str]:
        """A new session of ``token``: its cookie secret and its CSRF value. It ends after
        ``hours``, or when the token expires if that is sooner."""
        now = now or utcnow()
        secret = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(24)
        ends = now + timedelta(hours=self.hours)
        if token.expires_at is not None:
            ends = min(ends, as_utc(token.expires_at))
        row = ConsoleSessionRow(
            id=_hash(secret), token_id=token.id, csrf=csrf, created_at=now, expires_at=ends
        )
        with self.catalog.session() as s:
            # Sessions that ended are forgotten as new ones begin.
            s.execute(sa_delete(ConsoleSessionRow).where(col(ConsoleSessionRow.expires_at) < now))
            s.add(row)
        return secret, csrf

    def find(
        self, secret: str | None, now: datetime | None = None
    ) -> tuple[ConsoleSessionRow, ApiTokenRow] | None:
        """The session of a cookie and its token, while both are valid; else None."""
        if not secret or len(secret) > 100:
            return None
        now = now or utcnow()
        with self.catalog.session() as s:
            row = s.get(ConsoleSessionRow, _hash(secret))
            if row is None or as_utc(row.expires_at) <= now:
                return None
            token = s.get(ApiTokenRow, row.token_id)
            if token is None or token.revoked_at is not None:
                return None
            if token.expires_at is not None and as_utc(token.expires_at) <= now:
                return None
            return row, token

    def close(self, secret: str | None) -> None:
        """Sign a session out (nothing happens for one that does not exist)."""
        if not secret:
            return
        with self.catalog.session() as s:
            row = s.get(ConsoleSessionRow, _hash(secret))
            if row is not None:
                s.delete(row)
