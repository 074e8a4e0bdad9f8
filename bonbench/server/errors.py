"""Typed API errors. The service raises them; the app's one handler turns each into OpenAI's
nested body ``{"error": {"message", "type", "param", "code"}}`` with its HTTP status."""

from __future__ import annotations


class APIError(Exception):
    status: int = 500
    type: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(APIError):
    status, type = 400, "invalid_request_error"


class Unauthorized(APIError):
    status, type = 401, "authentication_error"


class ModelNotFound(APIError):
    status, type = 404, "invalid_request_error"


class NotFound(APIError):
    status, type = 404, "invalid_request_error"


class RequestTooLarge(APIError):
    status, type = 413, "invalid_request_error"


class Overloaded(APIError):
    status, type = 503, "server_overloaded"


class GenerationFailed(APIError):
    status, type = 500, "generation_error"


class RewardFailed(APIError):
    status, type = 500, "reward_error"


class UpstreamFailed(APIError):
    status, type = 502, "upstream_error"
