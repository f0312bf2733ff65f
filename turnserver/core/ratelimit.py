"""Token buckets per key (a client address), bounded in how many keys they remember."""

from __future__ import annotations


class TokenBuckets:
    """`rate` tokens per second up to `burst`; each allowed event spends one."""

    def __init__(self, rate: float, burst: int, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, key: str, now: float) -> bool:
        buckets = self._buckets
        tokens, last = buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + max(0.0, now - last) * self.rate)
        allowed = tokens >= 1.0
        if key not in buckets and len(buckets) >= self.max_keys:
            buckets.pop(next(iter(buckets)))  # forget the oldest key
        buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        return allowed
