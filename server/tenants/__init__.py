"""Tenants: who may call the server (API keys), as what (role), and how much (quotas, rate limits)."""

from server.tenants.auth import Authenticator
from server.tenants.ratelimit import RateLimiter
from server.tenants.store import Principal, Quotas, Role, TenantInfo, TenantStore, hash_key

__all__ = ["Authenticator", "Principal", "Quotas", "RateLimiter", "Role", "TenantInfo", "TenantStore", "hash_key"]
