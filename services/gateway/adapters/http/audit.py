"""`GET /v1/audit`: the caller's entries (admins: their org's), filtered, newest first."""

from datetime import datetime
from typing import Annotated, Any

from litestar import Request, get
from litestar.params import Parameter

from contracts.commands.audit import AuditFilter, AuditPage, QueryAudit
from services.gateway.adapters.http.context import caller, gateway_of, meta


@get("/v1/audit", summary="Audit trail", tags=["audit"])
async def audit(
    request: Request[Any, Any, Any],
    action: str | None = None,
    actor: str | None = None,
    resource_type: str | None = None,
    resource_id: str | None = None,
    outcome: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: Annotated[int, Parameter(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Parameter(max_length=512)] = None,
) -> AuditPage:
    p = caller(request)
    query = QueryAudit(
        meta=meta(request),
        org_id=p.org_id,
        user_id=p.user_id,
        is_admin=p.is_admin,
        filter=AuditFilter(
            action=action,
            actor=actor,
            resource_type=resource_type,
            resource_id=resource_id,
            outcome=outcome,
            since=since,
            until=until,
        ),
        limit=limit,
        cursor=cursor,
    )
    page: AuditPage = await gateway_of(request).client.call("audit", "query", query, AuditPage)
    return page
