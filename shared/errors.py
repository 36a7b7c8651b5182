"""The errors stores and services raise, one tree; the gateway maps each kind to its HTTP status."""


class BunchError(Exception):
    """Something a caller asked for cannot be done; the message says why, for a person to act on."""

    status_code = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(BunchError):
    status_code = 404


class Conflict(BunchError):
    status_code = 409


class Invalid(BunchError):
    status_code = 422


class OverQuota(BunchError):
    """An operator's quota refuses this for now; nothing was written. Try again after `retry_after` s."""

    status_code = 429

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = max(1, retry_after)


class Unavailable(BunchError):
    status_code = 503
