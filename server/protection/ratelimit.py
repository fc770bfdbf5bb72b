"""Token buckets that keep one caller, or one queue, from taking the whole server.

The server checks a limit on every request, on the event loop, before it does any work, so
the check must cost next to nothing: a dict lookup and a little float arithmetic when the
request is granted. There are no locks (everything runs on one thread) and no timers: a
bucket is refilled lazily, from the time that has passed.

A refused request learns when one token will be there, which the server sends back as
Retry-After, so well-behaved clients wait exactly as long as they must and no longer.

Buckets are created on first use of a key and their number is bounded: a server that sees
many principals (or queues) forgets the ones it has not seen for longest, preferring those
whose buckets are full, since forgetting a full bucket changes nothing.
"""

from __future__ import annotations

import dataclasses
import decimal
import functools
import itertools
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable

import xxhash

from engine.errors import ConfigError, InvalidParameterError
from server.errors import ThrottledError
from server.protection._shared_buckets import SharedBuckets

Clock = Callable[[], float]

RATE_MAX = 1_000_000.0
BURST_MAX = 10_000_000

# "<rate>/s" or "<rate>/s:<burst>"; ASCII digits only (``\d`` would take any Unicode
# digit, which float() and int() then read in ways nobody writing a config means).
_RATE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?|\.[0-9]+)/s(?::([0-9]+))?")
_OFF = frozenset({"", "0", "off"})

# Times are float seconds, so a client that waits exactly the Retry-After it was given can
# find the bucket a rounding error short of a token, and be refused again for a few
# picoseconds. Granting this much early (a thousandth of a token at the highest rate), but
# never telling a client to come back early, prevents it.
_SLACK_S = 1e-9

# Seeds that keep the keys of the limiters sharing one table apart.
PRINCIPALS_SEED, QUEUES_SEED, PURGES_SEED = 1, 2, 3
# Rates whose bucket times a SharedLimiter keeps worked out.
_RATES_KEPT = 1024

# How many of the least recently used buckets eviction looks at for a full one. The least
# recently used are the likeliest to be full; looking further would make eviction O(n).
_EVICTION_WINDOW = 16


@dataclasses.dataclass(frozen=True, slots=True)
class Rate:
    """``per_second`` tokens are added each second, up to ``burst`` held at once."""

    per_second: float
    burst: int

    def __post_init__(self) -> None:
        if not 0 < self.per_second <= RATE_MAX:  # also refuses NaN
            raise InvalidParameterError("rate", self.per_second, "the rate must be over 0 and "
                                        f"at most {RATE_MAX:.0f} per second")
        if not 1 <= self.burst <= BURST_MAX:
            raise InvalidParameterError("burst", self.burst,
                                        f"the burst must be 1..{BURST_MAX}")

    def __str__(self) -> str:
        """The syntax :func:`parse_rate` reads (decimal, never an exponent)."""
        per_second = format(decimal.Decimal(repr(self.per_second)).normalize(), "f")
        return f"{per_second}/s:{self.burst}"


def parse_rate(text: str, name: str = "rate") -> Rate | None:
    """Read ``"100/s"`` or ``"100/s:200"``; ``"0"``, ``""`` or ``"off"`` mean no limit.

    The burst defaults to one second's worth of tokens (at least one). ``name`` is the
    setting or attribute the text came from, so the error names what the user wrote.
    """
    stripped = text.strip()
    if stripped.lower() in _OFF:
        return None
    match = _RATE_RE.fullmatch(stripped)
    if match is None:
        raise InvalidParameterError(name, text, "expected <rate>/s or <rate>/s:<burst>, "
                                                "or 0 or off for no limit")
    per_second = float(match[1])
    if per_second == 0:
        # "0/s" could mean "refuse everything" as well as "no limit": make the user say.
        raise InvalidParameterError(name, text, "the rate must be over 0; "
                                                "write 0 or off for no limit")
    if match[2] is None:
        burst = max(1, math.ceil(per_second))
    else:
        # More digits than BURST_MAX has is out of range whatever they say; not reading
        # them also keeps int() off a digit string of any length.
        burst = int(match[2]) if len(match[2]) <= len(str(BURST_MAX)) else BURST_MAX + 1
    try:
        return Rate(per_second, burst)
    except InvalidParameterError as exc:
        raise InvalidParameterError(name, text, exc.reason) from None


def within(rate: Rate, ceiling: Rate) -> bool:
    """True if ``rate`` admits nothing ``ceiling`` would refuse: no faster, no larger burst."""
    return rate.per_second <= ceiling.per_second and rate.burst <= ceiling.burst


@functools.lru_cache(maxsize=1024)
def tighter(rate: Rate, ceiling: Rate) -> Rate:
    """``rate`` held under ``ceiling``: the lower rate and the smaller burst of the two.

    Cached, so that the same pair gives the same Rate object each time and the limiter's
    identity check stays on its fast path; bounded, since rates come from queue
    attributes.
    """
    if within(rate, ceiling):
        return rate
    if within(ceiling, rate):
        return ceiling
    return Rate(min(rate.per_second, ceiling.per_second), min(rate.burst, ceiling.burst))


class TokenBucket:
    """``rate.burst`` tokens at most, refilled at ``rate.per_second``; starts full.

    Kept in the equivalent "theoretical arrival time" form (GCRA): rather than a token count
    and the time it was counted, one float, the time at which the bucket will be full
    again. A take is then a clock read and a few float operations, with no division.
    """

    __slots__ = ("_burst_s", "_clock", "_horizon", "_interval", "_tat", "rate")

    def __init__(self, rate: Rate, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._set(rate)
        self._tat = clock()  # full: it was full by now

    def take(self, n: int = 1) -> float:
        """Take ``n`` tokens and return 0.0, or take none and return the seconds until
        ``n`` will be there (``math.inf`` if ``n`` is more than the bucket holds)."""
        now = self._clock()
        tat = self._tat
        if tat < now:
            tat = now
        tat += n * self._interval
        if tat - now <= self._horizon:
            self._tat = tat
            return 0.0
        if n > self.rate.burst:
            return math.inf
        return tat - now - self._burst_s

    @property
    def tokens(self) -> float:
        """The tokens there now (nothing is taken)."""
        return max(0.0, self.rate.burst - self._missing(self._clock()))

    def set_rate(self, rate: Rate) -> None:
        """Switch to ``rate``, keeping the tokens there now (cut to the new burst).

        Not refilling on a change means that changing a limit, which a queue's owner can
        do, never hands out a fresh burst.
        """
        now = self._clock()
        tokens = min(max(0.0, self.rate.burst - self._missing(now)), rate.burst)
        self._set(rate)
        self._tat = now + (rate.burst - tokens) * self._interval

    def _set(self, rate: Rate) -> None:
        self.rate = rate
        self._interval = 1.0 / rate.per_second
        # The seconds an empty bucket takes to fill. A take is granted if the bucket would
        # be full again within that (plus the slack) after it.
        self._burst_s = rate.burst * self._interval
        self._horizon = self._burst_s + _SLACK_S

    def _missing(self, now: float) -> float:
        return max(0.0, self._tat - now) * self.rate.per_second


class Limiter:
    """Token buckets by key (a principal, a queue), each with the rate given at call time.

    At most ``max_keys`` buckets are kept, in order of last use. A new key beyond that
    evicts one: the first full bucket among the few least recently used (a new bucket
    starts full, so dropping a full one changes nothing), else the least recently used.
    Eviction is O(1), so a stream of new keys never stalls the event loop on a sweep.
    """

    def __init__(self, max_keys: int = 100_000, clock: Clock = time.monotonic) -> None:
        if max_keys < 1:
            raise ConfigError("rate limiter max_keys", max_keys, "must be at least 1")
        self.max_keys = max_keys
        self._clock = clock
        # OrderedDict for move_to_end: keeping recency costs one C call per check.
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self.evicted = 0
        """Buckets evicted that were not full, so that their key got a fresh burst."""

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: str) -> bool:
        return key in self._buckets

    def check(self, key: str, rate: Rate | None, scope: str) -> None:
        """Charge one request to ``key`` at ``rate`` (``None``: unlimited), or raise
        :class:`ThrottledError` naming ``scope``, with the seconds until a token is there.

        Pass the same :class:`Rate` object for a key while its limit is unchanged: the
        bucket is matched to it by identity first, which costs nothing.
        """
        if rate is None:
            return
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None or bucket.rate is not rate:
            bucket = self._bucket(key, rate)
        else:
            buckets.move_to_end(key)
        # bucket.take(1), inlined: the call would cost a quarter of the check.
        now = self._clock()
        tat = bucket._tat
        if tat < now:
            tat = now
        tat += bucket._interval
        if tat - now <= bucket._horizon:
            bucket._tat = tat
            return
        raise ThrottledError(scope, tat - now - bucket._burst_s)

    def _bucket(self, key: str, rate: Rate) -> TokenBucket:
        """The slow path: a key seen for the first time, or a Rate object not seen before."""
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            if len(buckets) >= self.max_keys:
                self._evict()
            bucket = buckets[key] = TokenBucket(rate, self._clock)
            return bucket
        buckets.move_to_end(key)
        if bucket.rate != rate:
            bucket.set_rate(rate)
        else:
            bucket.rate = rate  # an equal Rate: adopt it, so the identity check holds next
        return bucket

    def _evict(self) -> None:
        buckets = self._buckets
        now = self._clock()
        victim = None
        for key, bucket in itertools.islice(buckets.items(), _EVICTION_WINDOW):
            if bucket._tat <= now:
                victim = key
                break
        if victim is None:
            victim = next(iter(buckets))
            self.evicted += 1
        del buckets[victim]


class SharedLimiter:
    """A :class:`Limiter` whose buckets every worker of the server shares
    (server/protection/_shared_buckets.pyx), so that a limit holds for the whole server
    however its connections spread over the workers.

    A key whose slots of the shared table are all busy with other keys' buckets falls
    back on this process's own ``Limiter`` for the moment; the table is sized so that this
    takes tens of thousands of keys busy at once.
    """

    def __init__(self, buckets: SharedBuckets, seed: int) -> None:
        self._buckets = buckets
        self._seed = seed
        """Keys of different limiters sharing a table hash apart."""
        self._fallback = Limiter()
        self._times: dict[Rate, tuple[int, int]] = {}

    def check(self, key: str, rate: Rate | None, scope: str) -> None:
        if rate is None:
            return
        times = self._times.get(rate)
        if times is None:
            times = self._times_of(rate)
        wait_ns = self._buckets.take(xxhash.xxh3_64_intdigest(key.encode(), self._seed),
                                     *times)
        if wait_ns == 0:
            return
        if wait_ns < 0:
            self._fallback.check(key, rate, scope)
            return
        raise ThrottledError(scope, wait_ns / 1e9)

    def _times_of(self, rate: Rate) -> tuple[int, int]:
        """(nanoseconds per token, nanoseconds an empty bucket takes to fill)."""
        interval = max(1, round(1e9 / rate.per_second))
        if len(self._times) >= _RATES_KEPT:
            self._times.clear()  # rates come from queue attributes: bounded, not fixed
        times = self._times[rate] = (interval, interval * rate.burst)
        return times
