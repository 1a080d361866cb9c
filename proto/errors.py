"""The one error type of the wire contract.

Every malformed input, whatever layer notices it, becomes a ``ProtocolError``
carrying an HTTP status, a short machine code and a sentence that tells the
caller what to fix. The service turns it into the documented error body; a
client gets the same message without running a server.
"""

from __future__ import annotations


class ProtocolError(ValueError):
    """Input that breaks the wire contract; ``detail`` says what to fix."""

    def __init__(self, detail: str, *, code: str = "invalid_request", status: int = 400) -> None:
        super().__init__(detail)
        self.detail = detail
        self.code = code
        self.status = status

    def __repr__(self) -> str:
        return f"ProtocolError(code={self.code!r}, status={self.status}, detail={self.detail!r})"
