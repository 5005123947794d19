"""The error a sample is quarantined with."""


class DecodeError(Exception):
    """A sample that cannot be used; ``reason`` is a short category for the errors table."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
