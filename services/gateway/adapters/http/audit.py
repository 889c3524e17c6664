"""`GET /v1/audit` and `GET /v1/audit/export`: the caller's entries (admins: their org's).

Both take the same filters and see the same entries (the audit service applies the reader's
scope); the export streams every match as NDJSON, newest first, one page at a time, so it
never holds the whole result in memory.
"""

import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, get
from litestar.di import Provide
from litestar.params import Parameter
from litestar.response import Stream

from contracts.commands.audit import AuditFilter, AuditPage, QueryAudit
from services.gateway.adapters.http.context import caller, gateway_of, meta
from services.kit.rpc import CommandFailed

log = logging.getLogger(__name__)
EXPORT_PAGE = 500
NDJSON = "application/x-ndjson"
_encoder = msgspec.json.Encoder()


def _query(request: Request[Any, Any, Any], where: AuditFilter, limit: int, cursor: str | None) -> QueryAudit:
    p = caller(request)
    return QueryAudit(
        meta=meta(request),
        org_id=p.org_id,
        user_id=p.user_id,
        is_admin=p.is_admin,
        filter=where,
        limit=limit,
        cursor=cursor,
    )


async def _page(request: Request[Any, Any, Any], query: QueryAudit) -> AuditPage:
    page: AuditPage = await gateway_of(request).client.call("audit", "query", query, AuditPage)
    return page


def audit_filter(
    action: str | None = None,
    actor: str | None = None,
    resource_type: str | None = None,
    resource_id: str | None = None,
    outcome: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> AuditFilter:
    """The filters both routes take, as query parameters."""
    return AuditFilter(
        action=action,
        actor=actor,
        resource_type=resource_type,
        resource_id=resource_id,
        outcome=outcome,
        since=since,
        until=until,
    )


FILTER = {"where": Provide(audit_filter, sync_to_thread=False)}


@get("/v1/audit", summary="Audit trail", tags=["audit"], dependencies=FILTER)
async def audit(
    request: Request[Any, Any, Any],
    where: AuditFilter,
    limit: Annotated[int, Parameter(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Parameter(max_length=512)] = None,
) -> AuditPage:
    return await _page(request, _query(request, where, limit, cursor))


@get(
    "/v1/audit/export",
    summary="Audit trail as NDJSON",
    description="Every entry `GET /v1/audit` would page through for these filters, one JSON object a line.",
    tags=["audit"],
    media_type=NDJSON,
    dependencies=FILTER,
)
async def export(request: Request[Any, Any, Any], where: AuditFilter) -> Stream:
    # The first page is read before the response starts: a bad filter is still a 400.
    first = await _page(request, _query(request, where, EXPORT_PAGE, None))
    return Stream(_lines(request, where, first), media_type=NDJSON, headers={"Cache-Control": "no-store"})


async def _lines(
    request: Request[Any, Any, Any], where: AuditFilter, page: AuditPage
) -> AsyncIterator[bytes]:
    while True:
        if page.items:
            yield b"".join(_encoder.encode(item) + b"\n" for item in page.items)
        if page.next_cursor is None:
            return
        try:
            page = await _page(request, _query(request, where, EXPORT_PAGE, page.next_cursor))
        except CommandFailed as err:  # the status is sent: say so on a last line and stop
            log.warning("audit export stopped early: %s", err.problem.detail)
            yield _encoder.encode({"error": err.problem.detail, "complete": False}) + b"\n"
            return
