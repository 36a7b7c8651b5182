import random


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter: attempt 1 waits up to `base`, doubling up to `cap`."""
    return random.uniform(0, min(cap, base * 2 ** max(attempt - 1, 0)))
