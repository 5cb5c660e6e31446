"""Google's error model: ``{"error": {"code", "message", "status"}}``, with the HTTP code of each status."""

from __future__ import annotations

HTTP_CODES = {
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "ABORTED": 409, "RESOURCE_EXHAUSTED": 429,
    "INTERNAL": 500, "UNIMPLEMENTED": 501, "UNAVAILABLE": 503,
}


class ApiError(Exception):
    """An error answered in Google's error model; ``status`` is a ``google.rpc.Code`` name."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = HTTP_CODES[status]
        self.message = message

    def body(self) -> dict[str, object]:
        return {"error": {"code": self.code, "message": self.message, "status": self.status}}


class InvalidArgument(ApiError):
    def __init__(self, message: str):
        super().__init__("INVALID_ARGUMENT", message)


class NotFound(ApiError):
    def __init__(self, message: str):
        super().__init__("NOT_FOUND", message)


class FailedPrecondition(ApiError):
    def __init__(self, message: str):
        super().__init__("FAILED_PRECONDITION", message)


class Unauthenticated(ApiError):
    """For the ``authorize`` hook: no or an invalid credential."""

    def __init__(self, message: str = "Request had invalid authentication credentials."):
        super().__init__("UNAUTHENTICATED", message)


class PermissionDenied(ApiError):
    """For the ``authorize`` hook: a caller that may not make this call."""

    def __init__(self, message: str = "The caller does not have permission"):
        super().__init__("PERMISSION_DENIED", message)
