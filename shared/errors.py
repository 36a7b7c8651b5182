"""The errors stores and services raise, one tree.

Each kind says what went wrong, never how to answer it: the gateway maps each kind to its HTTP
status in one place (services/gateway/errors.py).

    BunchError
    ├── NotFound          no such thing in the caller's project
    ├── Conflict          the thing's current state forbids it
    │   └── InProgress    the same request is being answered right now (retry_after)
    ├── Invalid           the request itself is wrong
    │   ├── Unreadable    not parseable at all (not JSON, nested too deep)
    │   ├── TooLarge      over a size, count or cost limit
    │   ├── Unsupported   a kind of content Bunch does not take
    │   └── MissingKeys   records it names do not exist (indices)
    ├── OverQuota         an operator's quota refuses it for now (retry_after)
    ├── OverBudget        it would cost more than the project's budget has left (figures)
    ├── Unauthenticated   no credentials, or unknown ones
    ├── Forbidden         credentials that do not allow this
    ├── Unavailable       a dependency is down; nothing was changed
    ├── UpstreamError     a service Bunch calls (RunPod) failed a call; `retryable` says whether
    │                     trying again later may help
    └── Misconfigured     the service's settings cannot work (a wrong password, an unknown Redis
                          master): it stops and says why instead of retrying
"""


class BunchError(Exception):
    """Something a caller asked for cannot be done; the message says why, for a person to act on."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(BunchError):
    pass


class Conflict(BunchError):
    pass


class InProgress(Conflict):
    """Its first sending (the same Idempotency-Key) is still running; its answer comes after `retry_after` s."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Invalid(BunchError):
    pass


class Unreadable(Invalid):
    pass


class TooLarge(Invalid):
    pass


class Unsupported(Invalid):
    pass


class MissingKeys(Invalid):
    """Records a write required do not exist; nothing was written. `indices`: their positions among
    the keys given, for the caller to say what they stand for (upload ids, say)."""

    def __init__(self, indices: list[int]) -> None:
        super().__init__(f"{len(indices)} of the records this needs do not exist.")
        self.indices = indices


class OverQuota(BunchError):
    """Nothing was written. Try again after `retry_after` s."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = max(1, retry_after)


class OverBudget(BunchError):
    """Nothing was written: what it would cost exceeds what the project's budget has left this
    period. `figures`: the quote, the spend, the limit, what is left, the period and when it resets."""

    def __init__(self, message: str, figures: dict[str, float | str]) -> None:
        super().__init__(message)
        self.figures = figures


class Unauthenticated(BunchError):
    pass


class Forbidden(BunchError):
    pass


class Unavailable(BunchError):
    pass


class UpstreamError(BunchError):
    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class Misconfigured(BunchError):
    pass
