"""Per-tenant quotas: the one schema that the store keeps and the service enforces.

An override is stored at ``quotas/<tenant>.json`` (beside ``bases/`` and ``tenants/``), so every
replica on one store sees it within its refresh interval and it survives restarts; a field left
``null`` falls back to the service's default (``LORAPLEX_TENANT_*`` settings).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

QUOTA_PREFIX = "quotas/"


class TenantQuota(BaseModel):
    """Limits of one tenant; ``None`` means "the service default"."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rps: float | None = Field(
        default=None, gt=0, le=1e6, description="Sustained requests per second (token bucket refill rate)."
    )
    burst: int | None = Field(
        default=None, ge=1, le=1_000_000, description="Requests allowed at once above the rate (bucket size)."
    )
    max_inflight_rows: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="Rows (items x fanned-out adapters) of this tenant queued or running at once.",
    )

    def over(self, defaults: TenantQuota) -> TenantQuota:
        """This override with its unset fields taken from ``defaults``."""
        return defaults.model_copy(update=self.model_dump(exclude_none=True))


def quota_key(tenant: str) -> str:
    from adapters_store.names import validate_name

    return f"{QUOTA_PREFIX}{validate_name(tenant, 'tenant')}.json"
