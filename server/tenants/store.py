"""Tenants and their API keys, in the registry database.

A key is shown once, when the tenant is created, and never stored: the table
keeps only its sha256. Keys are 256 random bits, so a fast hash is enough (no
one can brute-force 2**256 candidates; GitHub stores its tokens the same way);
a slow password hash would only make every request slower.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass, field
from enum import StrEnum

from server.adapters.compat import VLLM_RANKS
from server.db import Database
from server.errors import Conflict, InvalidArgument, PermissionDenied, TenantNotFound

KEY_PREFIX = "lpx_"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class Role(StrEnum):
    ADMIN = "admin"
    """Manages tenants and every tenant's adapters; not rate limited."""
    TENANT = "tenant"
    """Uploads and serves its own adapters only."""


@dataclass(frozen=True)
class Quotas:
    max_adapters: int = 100
    """Active adapters the tenant may hold at once."""
    max_rank: int = 64
    """Highest LoRA rank the tenant may upload (one of vLLM's ranks)."""
    requests_per_minute: int = 600
    """Sustained inference request rate; a full minute's worth may come as one burst."""
    max_concurrent_requests: int = 64
    """Inference requests in flight at once; more get 429 with Retry-After."""
    max_inflight_tokens: int = 262144
    """Tokens the tenant's running requests may still generate (max_tokens x n each); more get 429."""

    def __post_init__(self) -> None:
        for name in FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidArgument(f"`{name}` must be a positive integer; got {value!r}", field=name)
        if self.max_rank not in VLLM_RANKS:
            raise InvalidArgument(f"`max_rank` must be one of {', '.join(map(str, VLLM_RANKS))} "
                                  f"(vLLM accepts no other ranks); got {self.max_rank}", field="max_rank")


FIELDS = ("max_adapters", "max_rank", "requests_per_minute", "max_concurrent_requests", "max_inflight_tokens")
"""Quotas' fields, which are also the tenants table's quota columns."""


@dataclass(frozen=True)
class Principal:
    """Who a request comes from, once its key checked out."""

    tenant: str
    role: Role
    quotas: Quotas = field(default_factory=Quotas)

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


@dataclass(frozen=True)
class TenantInfo:
    name: str
    role: Role
    quotas: Quotas
    created_at: float
    revoked: bool
    key_prefix: str
    """The key's first characters (``lpx_`` + 4), enough to tell which key a tenant holds."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def validate_tenant_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidArgument(f"tenant name {name!r} is invalid: use 1-63 characters of a-z, 0-9, '_' or '-', "
                              "starting with a letter or digit", field="name")


class TenantStore:
    """CRUD over the ``tenants`` table. ``generation`` (the database's shared counter) goes up on
    every write by any server, so a snapshot of principals (see
    :class:`server.tenants.auth.Authenticator`) knows when it is stale."""

    def __init__(self, db: Database):
        self._db = db

    @property
    def generation(self) -> int:
        return self._db.generation

    def create(self, name: str, role: Role = Role.TENANT, quotas: Quotas = Quotas()) -> str:
        """Add a tenant and return its API key. This is the only time the key exists outside the caller."""
        validate_tenant_name(name)
        role = Role(role)
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self._db.transaction() as conn:
            if conn.execute("SELECT 1 FROM tenants WHERE name = ?", (name,)).fetchone():
                raise Conflict(f"tenant {name!r} already exists", field="name")
            conn.execute(
                f"INSERT INTO tenants (name, role, key_hash, key_prefix, created_at, {', '.join(FIELDS)}) "
                f"VALUES (?, ?, ?, ?, ?{', ?' * len(FIELDS)})",
                (name, role.value, hash_key(key), key[:8], time.time(), *(getattr(quotas, f) for f in FIELDS)))
        return key

    def get(self, name: str) -> TenantInfo:
        row = self._db.query_one("SELECT * FROM tenants WHERE name = ?", (name,))
        if row is None:
            raise TenantNotFound(f"tenant {name!r} does not exist", field="name")
        return _info(row)

    def list(self) -> list[TenantInfo]:
        return [_info(row) for row in self._db.query("SELECT * FROM tenants ORDER BY name")]

    def acting_for(self, principal: Principal, tenant: str | None) -> str:
        """The tenant whose adapters a call acts on: the caller's own, or any for an admin."""
        if tenant is None or tenant == principal.tenant:
            return principal.tenant
        if not principal.is_admin:
            raise PermissionDenied("only an admin key may act on another tenant's adapters", field="tenant")
        try:
            self.get(tenant)
        except TenantNotFound as e:
            raise TenantNotFound(e.message, field="tenant") from None
        return tenant

    def quotas_for(self, principal: Principal, tenant: str) -> Quotas:
        """The quotas of ``tenant``, which ``principal`` acts for (:meth:`acting_for`)."""
        return principal.quotas if tenant == principal.tenant else self.get(tenant).quotas

    def revoke(self, name: str) -> None:
        """The tenant's key stops authenticating at once. Its adapters stay (an admin can still manage them)."""
        self._update(name, "UPDATE tenants SET revoked_at = COALESCE(revoked_at, ?) WHERE name = ?", (time.time(),))

    def set_quotas(self, name: str, quotas: Quotas) -> None:
        self._update(name, f"UPDATE tenants SET {', '.join(f'{f} = ?' for f in FIELDS)} WHERE name = ?",
                     tuple(getattr(quotas, f) for f in FIELDS))

    def principals(self) -> dict[str, Principal]:
        """Every live (not revoked) tenant by its key's hash: the authenticator's snapshot."""
        rows = self._db.query("SELECT * FROM tenants WHERE revoked_at IS NULL")
        return {row["key_hash"]: Principal(row["name"], Role(row["role"]), _quotas(row)) for row in rows}

    def principal_for(self, key_hash: str) -> Principal | None:
        """The live (not revoked) tenant holding the key with this hash, or None."""
        row = self._db.query_one("SELECT * FROM tenants WHERE key_hash = ? AND revoked_at IS NULL", (key_hash,))
        return None if row is None else Principal(row["name"], Role(row["role"]), _quotas(row))

    def _update(self, name: str, sql: str, params: tuple) -> None:
        with self._db.transaction() as conn:
            if conn.execute(sql, (*params, name)).rowcount == 0:
                raise TenantNotFound(f"tenant {name!r} does not exist", field="name")


def _quotas(row) -> Quotas:
    return Quotas(**{f: row[f] for f in FIELDS})


def _info(row) -> TenantInfo:
    return TenantInfo(row["name"], Role(row["role"]), _quotas(row), row["created_at"],
                      row["revoked_at"] is not None, row["key_prefix"])
