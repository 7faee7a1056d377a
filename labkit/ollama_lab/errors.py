"""Errors of the Ollama-compatible server, and the one place that turns them into JSON.

Native ``/api/*`` routes answer Ollama's ``{"error": "message"}``; the OpenAI-compatible ``/v1/*``
routes answer OpenAI's ``{"error": {"message", "type", "param", "code"}}``. Both the status-coded
responses and the errors that arrive as a last line of a stream come from :func:`error_body`.
"""
from __future__ import annotations


class APIError(Exception):
    """An error with an HTTP status, sent as ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def not_found(name: str) -> APIError:
    return APIError(404, f"model '{name}' not found")


def error_body(status: int, message: str, *, openai: bool = False) -> dict:
    """The JSON of an error: Ollama's shape, or OpenAI's (``openai=True``).

    A stream that fails after its status line was sent reports its error as a 500 here (OpenAI
    type ``api_error``), whatever the exception's own status.

    >>> error_body(404, "model 'x' not found")
    {'error': "model 'x' not found"}
    >>> error_body(404, "model 'x' not found", openai=True)["error"]["code"]
    'model_not_found'
    """
    if not openai:
        return {"error": message}
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return {"error": {"message": message, "type": kind, "param": None,
                      "code": "model_not_found" if status == 404 else None}}


def error_response(status: int, message: str, *, openai: bool = False):
    """:func:`error_body` as a ``JSONResponse`` with that status."""
    from starlette.responses import JSONResponse
    return JSONResponse(error_body(status, message, openai=openai), status_code=status)
