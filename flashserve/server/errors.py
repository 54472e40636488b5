"""The server's refusals: ``InvalidRequestError`` (an HTTP error naming the field at fault) and OpenAI's error
body."""


class InvalidRequestError(ValueError):
    """A request the server refuses; ``param`` names the offending field (None when no single field is at fault)."""

    def __init__(self, message: str, param: str | None = None, status_code: int = 400, code: str | None = None,
                 error_type: str = "invalid_request_error"):
        super().__init__(message)
        self.param = param
        self.status_code = status_code
        self.code = code
        self.error_type = error_type


def error_body(message: str, param: str | None = None, code: str | None = None,
               error_type: str = "invalid_request_error") -> dict:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
