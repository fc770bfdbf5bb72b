"""Token buckets and the per-key limiter, mostly on a clock the test moves by hand."""

from __future__ import annotations

import math
import time

import pytest

from engine.errors import ConfigError, InvalidAttributeError, InvalidParameterError
from server.errors import ThrottledError
from server.protection.ratelimit import Limiter, Rate, TokenBucket, parse_rate, tighter, within
from server.settings import RATE_LIMIT, QueueSettings, check_settings


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def granted(limiter: Limiter, key: str, rate: Rate | None) -> bool:
    try:
        limiter.check(key, rate, f"test {key}")
    except ThrottledError:
        return False
    return True


# --- TokenBucket ---------------------------------------------------------------------------


def test_burst_is_granted_then_refused_with_the_wait_for_one_token() -> None:
    clock = FakeClock()
    bucket = TokenBucket(Rate(10, 5), clock)
    assert [bucket.take() for _ in range(5)] == [0.0] * 5
    assert bucket.take() == pytest.approx(0.1)
    # A refusal takes nothing: asking again at once gives the same wait.
    assert bucket.take() == pytest.approx(0.1)
    clock.advance(0.04)
    assert bucket.take() == pytest.approx(0.06)
    clock.advance(0.06)
    assert bucket.take() == 0.0
    assert bucket.take() == pytest.approx(0.1)


@pytest.mark.parametrize("start", [1000.0, 123456.789])
@pytest.mark.parametrize("rate", [Rate(10, 1), Rate(7, 3), Rate(3, 2), Rate(1_000_000, 1)])
def test_waiting_exactly_the_retry_after_is_enough(start: float, rate: Rate) -> None:
    clock = FakeClock(start)
    bucket = TokenBucket(rate, clock)
    for _ in range(1000):
        wait = bucket.take()
        if wait:
            clock.advance(wait)
            assert bucket.take() == 0.0


def test_refill_is_exactly_the_rate_and_stops_at_the_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(Rate(4, 4), clock)
    for _ in range(4):
        assert bucket.take() == 0.0
    assert bucket.tokens == 0.0
    clock.advance(0.25)
    assert bucket.tokens == pytest.approx(1.0)
    assert bucket.take() == 0.0
    assert bucket.take() > 0
    clock.advance(1.0)
    assert sum(bucket.take() == 0.0 for _ in range(10)) == 4
    clock.advance(3600)  # a long idle does not bank more than the burst
    assert bucket.tokens == 4.0
    assert sum(bucket.take() == 0.0 for _ in range(10)) == 4


def test_take_several() -> None:
    clock = FakeClock()
    bucket = TokenBucket(Rate(2, 10), clock)
    assert bucket.take(7) == 0.0
    assert bucket.take(5) == pytest.approx(1.0)  # 3 there, 2 more take a second
    assert bucket.take(3) == 0.0
    assert bucket.take(11) == math.inf  # never: more than the bucket holds


@pytest.mark.parametrize("via", ["bucket", "limiter"])
def test_ten_times_the_rate_is_admitted_at_the_rate(via: str) -> None:
    clock = FakeClock()
    rate = Rate(100, 20)
    bucket = TokenBucket(rate, clock)
    limiter = Limiter(clock=clock)
    seconds, step = 10.0, 1 / 1000  # 1000 requests a second against 100/s
    accepted = 0
    for _ in range(int(seconds / step)):
        clock.advance(step)
        if via == "bucket":
            accepted += bucket.take() == 0.0
        else:
            accepted += granted(limiter, "k", rate)
    assert rate.per_second * seconds - 1 <= accepted <= rate.per_second * seconds + rate.burst


def test_real_clock_never_admits_more_than_the_rate_allows() -> None:
    rate = Rate(2000, 50)
    limiter = Limiter()
    accepted = calls = 0
    start = time.monotonic()
    while time.monotonic() - start < 1.0:
        accepted += granted(limiter, "k", rate)
        calls += 1
    elapsed = time.monotonic() - start
    assert accepted <= rate.per_second * elapsed + rate.burst
    assert calls > accepted > rate.burst  # it refilled, and it refused some


# --- parse_rate ----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "rate"), [
    ("100/s", Rate(100, 100)),
    ("100/s:200", Rate(100, 200)),
    ("100/s:1", Rate(100, 1)),
    ("0.5/s", Rate(0.5, 1)),
    ("2.5/s", Rate(2.5, 3)),
    (".25/s:4", Rate(0.25, 4)),
    (" 7/s:9 ", Rate(7, 9)),
    ("1000000/s", Rate(1_000_000, 1_000_000)),
    ("1/s:10000000", Rate(1, 10_000_000)),
])
def test_parse_rate(text: str, rate: Rate) -> None:
    assert parse_rate(text) == rate
    assert parse_rate(str(rate)) == rate


@pytest.mark.parametrize("text", ["", "0", "off", "OFF", " off "])
def test_parse_rate_no_limit(text: str) -> None:
    assert parse_rate(text) is None


@pytest.mark.parametrize("text", [
    "100", "100/m", "100/s:", "100/s:2.5", "/s", "-1/s", "1e3/s", "nan/s", "inf/s",
    "100 /s", "100/s: 5", "\u0661/s", "0/s", "0.0/s", "1000001/s", "1/s:0",
    "1/s:10000001", "1/s:" + "9" * 5000, "100/s:200:300",
])
def test_parse_rate_invalid(text: str) -> None:
    with pytest.raises(InvalidParameterError) as caught:
        parse_rate(text, "RateLimit")
    assert caught.value.parameter == "RateLimit"
    assert caught.value.value == text


def test_rate_checks_its_bounds() -> None:
    with pytest.raises(InvalidParameterError):
        Rate(0, 1)
    with pytest.raises(InvalidParameterError):
        Rate(float("nan"), 1)
    with pytest.raises(InvalidParameterError):
        Rate(1, 0)


# --- Limiter -------------------------------------------------------------------------------


def test_limiter_raises_throttled_with_scope_and_retry_after() -> None:
    clock = FakeClock()
    limiter = Limiter(clock=clock)
    rate = Rate(2, 2)
    limiter.check("AKIA1", rate, "principal AKIA1")
    limiter.check("AKIA1", rate, "principal AKIA1")
    with pytest.raises(ThrottledError) as caught:
        limiter.check("AKIA1", rate, "principal AKIA1")
    assert caught.value.scope == "principal AKIA1"
    assert caught.value.retry_after_s == pytest.approx(0.5)
    clock.advance(caught.value.retry_after_s)
    limiter.check("AKIA1", rate, "principal AKIA1")
    # Keys are independent.
    limiter.check("AKIA2", rate, "principal AKIA2")


def test_no_rate_means_no_limit_and_no_bucket() -> None:
    limiter = Limiter(clock=FakeClock())
    for _ in range(1000):
        limiter.check("q", None, "queue q")
    assert len(limiter) == 0


def test_a_changed_rate_keeps_the_tokens_there() -> None:
    clock = FakeClock()
    limiter = Limiter(clock=clock)
    slow = Rate(10, 10)
    while granted(limiter, "q", slow):
        pass
    # A higher limit takes effect at once, but does not hand out a fresh burst.
    fast = Rate(100, 100)
    with pytest.raises(ThrottledError) as caught:
        limiter.check("q", fast, "queue q")
    assert caught.value.retry_after_s == pytest.approx(0.01)
    clock.advance(0.05)
    assert sum(granted(limiter, "q", fast) for _ in range(10)) == 5
    # A lower burst cuts what is there.
    clock.advance(10)
    low = Rate(1, 2)
    assert [granted(limiter, "q", low) for _ in range(3)] == [True, True, False]


def test_an_equal_rate_object_is_the_same_limit() -> None:
    clock = FakeClock()
    limiter = Limiter(clock=clock)
    assert granted(limiter, "q", Rate(1, 1))
    assert not granted(limiter, "q", Rate(1, 1))  # equal, not identical: not a reset
    assert not granted(limiter, "q", parse_rate("1/s:1"))


def test_keys_are_bounded_and_the_least_recently_used_goes() -> None:
    clock = FakeClock()
    limiter = Limiter(max_keys=3, clock=clock)
    rate = Rate(0.001, 1)  # refills in 1000 s: no bucket here is full again
    for key in "abc":
        assert granted(limiter, key, rate)
        clock.advance(1)
    assert not granted(limiter, "a", rate)  # a refusal is a use too
    assert granted(limiter, "d", rate)
    assert len(limiter) == 3
    assert "b" not in limiter
    assert limiter.evicted == 1
    assert not granted(limiter, "a", rate)  # kept, and still empty
    assert granted(limiter, "b", rate)  # forgotten: a fresh bucket


def test_a_full_bucket_is_evicted_before_the_least_recently_used() -> None:
    clock = FakeClock()
    limiter = Limiter(max_keys=2, clock=clock)
    slow, fast = Rate(0.001, 1), Rate(1000, 1)
    assert granted(limiter, "slow", slow)
    assert granted(limiter, "fast", fast)
    clock.advance(0.01)  # "fast" is full again, "slow" is not
    assert granted(limiter, "new", slow)
    assert "slow" in limiter
    assert "fast" not in limiter
    assert limiter.evicted == 0  # dropping a full bucket changed nothing
    assert not granted(limiter, "slow", slow)


def test_many_keys_stay_within_the_bound() -> None:
    limiter = Limiter(max_keys=100, clock=FakeClock())
    rate = Rate(1, 1)
    for i in range(10_000):
        limiter.check(f"k{i}", rate, "k")
    assert len(limiter) == 100
    assert all(f"k{i}" in limiter for i in range(9_900, 10_000))


def test_max_keys_must_be_positive() -> None:
    with pytest.raises(ConfigError):
        Limiter(max_keys=0)


@pytest.mark.parametrize(("rate", "ceiling", "held"), [
    ("5/s:5", "10/s:20", "5/s:5"),  # tighter already: itself
    ("50/s:100", "10/s:20", "10/s:20"),  # looser in both: the ceiling
    ("5/s:100", "10/s:20", "5/s:20"),  # a lower rate but a larger burst: the smaller of each
    ("50/s:5", "10/s:20", "10/s:5"),
])
def test_a_rate_held_under_a_ceiling(rate: str, ceiling: str, held: str) -> None:
    wanted, limit = parse_rate(rate), parse_rate(ceiling)
    assert wanted is not None and limit is not None
    assert tighter(wanted, limit) == parse_rate(held)
    assert within(tighter(wanted, limit), limit)
    # The same pair gives the same object, so that the limiter keeps its fast path.
    assert tighter(wanted, limit) is tighter(Rate(wanted.per_second, wanted.burst), limit)


def test_a_queues_own_limit_never_lifts_the_servers() -> None:
    ceiling = parse_rate("10/s:20")
    for own, effective in (("5/s:5", "5/s:5"), ("50/s:50", "10/s:20"), ("off", "10/s:20"),
                           ("", "10/s:20")):
        settings = QueueSettings.of({RATE_LIMIT: own} if own else {})
        assert settings.rate_or(ceiling) == parse_rate(effective), own
    # With no server limit, the queue's own stands, "off" included.
    assert QueueSettings.of({RATE_LIMIT: "off"}).rate_or(None) is None
    assert QueueSettings.of({RATE_LIMIT: "50/s"}).rate_or(None) == parse_rate("50/s")


@pytest.mark.parametrize("lift", ["off", "0", "  ", "11/s", "10/s:21", "100/s:5"])
def test_setting_a_limit_above_the_servers_is_refused(lift: str) -> None:
    with pytest.raises(InvalidAttributeError, match="limits each queue to 10/s:20"):
        check_settings({RATE_LIMIT: lift}, None, parse_rate("10/s:20"))
    check_settings({RATE_LIMIT: lift}, None, None)  # no server limit: any is taken
    check_settings({RATE_LIMIT: "10/s:20"}, None, parse_rate("10/s:20"))
    check_settings({RATE_LIMIT: ""}, None, parse_rate("10/s:20"))  # back to the server's
