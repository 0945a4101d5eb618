"""The circuit breaker's state machine, with a fake clock, and under concurrent calls."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from appliance.resilience import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, CircuitOpen, open_message


class Down(Exception):
    """The dependency is down (counts)."""


class CallerError(Exception):
    """The caller asked something wrong (does not count)."""


class FakeOpen(CircuitOpen, RuntimeError):
    def __init__(self, dependency: str, retry_in: float) -> None:
        super().__init__(open_message(dependency, retry_in))
        self.dependency, self.retry_in = dependency, retry_in


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(clock: Callable[[], float] = time.monotonic, **kwargs: float) -> CircuitBreaker:
    return CircuitBreaker(
        "the thing at 127.0.0.1:1",
        is_failure=lambda exc: isinstance(exc, Down),
        open_error=FakeOpen,
        clock=clock,
        **kwargs,  # type: ignore[arg-type]
    )


class Counted:
    """A guarded function that counts its calls and fails while `down` is set."""

    def __init__(self) -> None:
        self.calls = 0
        self.down = True

    def __call__(self) -> str:
        self.calls += 1
        if self.down:
            raise Down("no route")
        return "ok"


def fail(breaker: CircuitBreaker, fn: Counted, times: int) -> None:
    for _ in range(times):
        with pytest.raises(Down):
            breaker.call(fn)


def test_opens_after_fail_max_and_fails_fast_without_calling() -> None:
    clock, fn = Clock(), Counted()
    breaker = make(clock, fail_max=3, reset_timeout_s=30)
    fail(breaker, fn, 2)
    assert (breaker.state, breaker.failures) == (CLOSED, 2)
    fail(breaker, fn, 1)
    assert breaker.state == OPEN
    clock.now += 10
    with pytest.raises(FakeOpen) as caught:
        breaker.call(fn)
    assert fn.calls == 3  # not called while open
    assert caught.value.dependency == "the thing at 127.0.0.1:1"
    assert caught.value.retry_in == pytest.approx(20.0)
    assert str(caught.value) == (
        "the thing at 127.0.0.1:1 is failing, circuit open: calls fail fast (next try in 20.0 s)"
    )


def test_half_open_probe_success_closes() -> None:
    clock, fn = Clock(), Counted()
    breaker = make(clock, fail_max=2, reset_timeout_s=5)
    fail(breaker, fn, 2)
    clock.now += 4.9
    assert breaker.state == OPEN
    clock.now += 0.1
    assert breaker.state == HALF_OPEN
    fn.down = False
    assert breaker.call(fn) == "ok"
    assert (breaker.state, breaker.failures, fn.calls) == (CLOSED, 0, 3)
    fn.down = True
    fail(breaker, fn, 1)  # counting starts afresh after closing
    assert (breaker.state, breaker.failures) == (CLOSED, 1)


def test_failed_probe_reopens_for_a_full_timeout() -> None:
    clock, fn = Clock(), Counted()
    breaker = make(clock, fail_max=2, reset_timeout_s=5)
    fail(breaker, fn, 2)
    clock.now += 5
    fail(breaker, fn, 1)  # the probe: one failure is enough to reopen
    assert breaker.state == OPEN and fn.calls == 3
    clock.now += 4
    with pytest.raises(FakeOpen):
        breaker.call(fn)
    clock.now += 1
    fn.down = False
    assert breaker.call(fn) == "ok" and breaker.state == CLOSED


def test_real_clock_with_a_tiny_timeout() -> None:
    fn = Counted()
    breaker = make(fail_max=1, reset_timeout_s=0.05)
    fail(breaker, fn, 1)
    with pytest.raises(FakeOpen):
        breaker.call(fn)
    time.sleep(0.06)
    fn.down = False
    assert breaker.call(fn) == "ok" and breaker.state == CLOSED


def test_excluded_exceptions_do_not_count_nor_reset() -> None:
    clock, fn = Clock(), Counted()
    breaker = make(clock, fail_max=3)

    def caller_error() -> None:
        raise CallerError("no such object")

    for _ in range(20):
        with pytest.raises(CallerError):
            breaker.call(caller_error)
    assert (breaker.state, breaker.failures) == (CLOSED, 0)
    fail(breaker, fn, 2)
    with pytest.raises(CallerError):
        breaker.call(caller_error)
    assert breaker.failures == 2  # not reset either
    fail(breaker, fn, 1)
    assert breaker.state == OPEN


def test_neutral_probe_keeps_half_open_and_frees_the_probe() -> None:
    clock, fn = Clock(), Counted()
    breaker = make(clock, fail_max=1, reset_timeout_s=1)
    fail(breaker, fn, 1)
    clock.now += 1

    def caller_error() -> None:
        raise CallerError("bad key")

    with pytest.raises(CallerError):
        breaker.call(caller_error)
    assert breaker.state == HALF_OPEN
    fn.down = False
    assert breaker.call(fn) == "ok" and breaker.state == CLOSED


def test_failures_far_apart_are_not_a_streak() -> None:
    clock, fn = Clock(), Counted()
    breaker = make(clock, fail_max=3, window_s=60)
    fail(breaker, fn, 2)
    clock.now += 61
    fail(breaker, fn, 1)
    assert (breaker.state, breaker.failures) == (CLOSED, 1)
    fail(breaker, fn, 2)
    assert breaker.state == OPEN


def test_success_resets_the_count() -> None:
    fn = Counted()
    breaker = make(fail_max=3)
    fail(breaker, fn, 2)
    fn.down = False
    breaker.call(fn)
    fn.down = True
    fail(breaker, fn, 2)
    assert (breaker.state, breaker.failures) == (CLOSED, 2)


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        make(fail_max=0)
    with pytest.raises(ValueError):
        make(reset_timeout_s=0)


# Threads -----------------------------------------------------------------------------------------
def test_calls_run_concurrently_the_lock_is_not_held_during_a_call() -> None:
    breaker = make(fail_max=5)
    inside = threading.Barrier(8, timeout=5)

    def slow() -> None:
        inside.wait()  # deadlocks (BrokenBarrierError) if calls were serialised
        time.sleep(0.05)

    threads = [threading.Thread(target=breaker.call, args=(slow,)) for _ in range(8)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.perf_counter() - started < 1.0
    assert breaker.state == CLOSED


def test_concurrent_failures_are_all_counted() -> None:
    breaker = make(fail_max=10_000)
    fn_errors: list[BaseException] = []

    def worker() -> None:
        for _ in range(200):
            try:
                breaker.call(Counted())
            except Down as exc:
                fn_errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert breaker.failures == len(fn_errors) == 3200


def test_concurrent_failures_open_it_and_then_everyone_fails_fast() -> None:
    breaker = make(fail_max=5, reset_timeout_s=60)
    calls = 0
    calls_lock = threading.Lock()
    outcomes: list[str] = []

    def down() -> None:
        nonlocal calls
        with calls_lock:
            calls += 1
        time.sleep(0.001)
        raise Down("refused")

    def worker() -> None:
        for _ in range(50):
            try:
                breaker.call(down)
            except FakeOpen:
                outcomes.append("fast")
            except Down:
                outcomes.append("down")

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert breaker.state == OPEN
    assert 5 <= calls <= 5 + 16  # at most one call per thread in flight when it opened
    assert outcomes.count("down") == calls and len(outcomes) == 800


def test_only_one_probe_while_half_open() -> None:
    clock = Clock()
    breaker = make(clock, fail_max=1, reset_timeout_s=1)
    fail(breaker, Counted(), 1)
    clock.now += 1
    release = threading.Event()
    probes = 0

    def probe() -> str:
        nonlocal probes
        probes += 1
        release.wait(5)
        return "ok"

    prober = threading.Thread(target=breaker.call, args=(probe,))
    prober.start()
    while probes == 0:
        time.sleep(0.001)
    rejected = 0
    for _ in range(20):
        with pytest.raises(FakeOpen) as caught:
            breaker.call(probe)
        assert "trial call is in flight" in str(caught.value)
        rejected += 1
    release.set()
    prober.join()
    assert (probes, rejected, breaker.state) == (1, 20, CLOSED)
