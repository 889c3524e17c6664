"""Every error leaves as `application/problem+json` with a sentence in `detail`."""

import logging
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from services.kit.rpc import CommandFailed

log = logging.getLogger(__name__)
PROBLEM_JSON = "application/problem+json"

_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Payload too large",
    415: "Unsupported media type",
    429: "Too many requests",
    503: "Service unavailable",
}


def problem(
    status: int, detail: str, title: str | None = None, retry_after_s: int | None = None, **extra: Any
) -> Response[Any]:
    body = {
        "type": "about:blank",
        "title": title or _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        **extra,
    }
    headers = {"WWW-Authenticate": 'Bearer realm="gatehouse"'} if status == 401 else {}
    if retry_after_s is not None:  # 429/503: when trying again may help
        headers["Retry-After"] = str(max(0, int(retry_after_s)))
        body["retry_after_s"] = max(0, int(retry_after_s))
    return Response(content=body, status_code=status, media_type=PROBLEM_JSON, headers=headers or None)


def quota_exceeded(sentence: str, retry_after_s: int | None) -> Response[Any]:
    """429 with the quota's sentence ("Monthly quota exceeded (50 calls). Upgrade to ...")."""
    return problem(429, sentence, title="Quota exceeded", retry_after_s=retry_after_s, code="quota_exceeded")


def _validation_detail(exc: ValidationException) -> tuple[str, list[Any]]:
    errors = exc.extra if isinstance(exc.extra, list) else []
    parts = []
    for err in errors:
        if isinstance(err, dict):
            where = err.get("key")
            parts.append(f"{err.get('message')}" + (f" (at `{where}`)" if where else ""))
    detail = "Invalid request: " + "; ".join(parts) if parts else str(exc.detail)
    return detail, errors


def on_http_exception(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    if isinstance(exc, ValidationException):
        detail, errors = _validation_detail(exc)
        return problem(400, detail, errors=errors)
    status = exc.status_code
    detail = exc.detail or _TITLES.get(status, "Error")
    if status == 400 and detail.startswith(("Input data was truncated", "JSON is malformed")):
        detail = f"The request body is not valid JSON: {detail[0].lower()}{detail[1:]}."
    if status == 404 and detail == "Not Found":
        detail = "No such resource."
    if status == 413:
        detail = "The request body is larger than this server accepts."
    if status == 405:
        detail = "This method is not allowed on this resource."
    return problem(status, detail)


def on_command_failed(_: Request[Any, Any, Any], exc: CommandFailed) -> Response[Any]:
    p = exc.problem
    code = {"code": p.code} if p.code else {}
    return problem(p.status, p.detail, title=p.title, retry_after_s=p.retry_after_s, **code)


def on_bad_encoding(_: Request[Any, Any, Any], exc: UnicodeDecodeError) -> Response[Any]:
    return problem(400, "The request body is not valid UTF-8 JSON.")


def on_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem(
        HTTP_500_INTERNAL_SERVER_ERROR,
        "Something went wrong on our side; it has been logged.",
        title="Internal error",
    )


HANDLERS = {
    UnicodeDecodeError: on_bad_encoding,
    HTTPException: on_http_exception,
    CommandFailed: on_command_failed,
    Exception: on_unexpected,
}
