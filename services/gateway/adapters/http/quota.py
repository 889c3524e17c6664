"""`GET /v1/quota`: the caller's tier, period and usage against each limit (null: unlimited)."""

from typing import Any

from litestar import Request, get

from contracts.commands.quota import GetQuota, QuotaView
from services.gateway.adapters.http.context import caller, gateway_of, meta


@get("/v1/quota", summary="My quota: tier, period, usage and limits", tags=["quota"])
async def quota(request: Request[Any, Any, Any]) -> QuotaView:
    p = caller(request)
    ask = GetQuota(meta=meta(request), user_id=p.user_id, org_id=p.org_id)
    view: QuotaView = await gateway_of(request).client.call("quota", "get", ask, QuotaView)
    return view
