"""A small thread-safe circuit breaker for calls to a dependency (the Tika server, the S3 object store).

closed ──(fail_max consecutive failures, each within `window_s` of the previous)──▶ open
open ──(reset_timeout_s elapsed)──▶ half-open: exactly one call goes through as a probe, the others
fail fast; a probe that succeeds closes the circuit, one that fails opens it again for reset_timeout_s.

While open, calls fail at once with the error that `open_error(dependency, retry_in)` builds: a
`CircuitOpen` that is also the caller's own "unavailable" error (`StorageUnavailable` for a store,
`ExtractionError("backend_unavailable")` for Tika), so callers need no new except clause.

Only what `is_failure(exc)` accepts counts. Any other exception is the caller's problem (a missing
object, a bad key, a corrupt document) and is neutral: it neither counts nor resets the count, and a
half-open probe that ends in one leaves the circuit half-open for the next call to probe again.

Why not `pybreaker` (1.4.1, the maintained PyPI library)? Its `CircuitBreaker.call` holds one RLock
for the whole guarded call, so every thread using a shared store would queue behind one slow S3 read
(60 s read timeout) or one Tika parse, and could not even fail fast while waiting. It also times the
open state with the wall clock (`datetime.now`, no injectable clock) and counts excluded exceptions as
successes. The state machine below is ~100 lines; the lock is held only to read and change state.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"


class CircuitOpen(Exception):  # noqa: N818 - the name says what happened, like StopIteration
    """Raised instead of calling a dependency whose circuit is open. Concrete errors mix this in with
    the caller's own error type (see `appliance.storage.breaker`, `appliance.extract.tika_backend`)."""

    dependency: str = ""
    retry_in: float = 0.0


def open_message(dependency: str, retry_in: float) -> str:
    """One line naming the dependency and when it is tried again."""
    if retry_in > 0:
        when = f"next try in {retry_in:.1f} s"
    else:
        when = "a trial call is in flight; next try when it ends"
    return f"{dependency} is failing, circuit open: calls fail fast ({when})"


class CircuitBreaker:
    """One dependency's breaker. Share one instance between every caller of that dependency."""

    def __init__(
        self,
        dependency: str,
        *,
        is_failure: Callable[[BaseException], bool],
        open_error: Callable[[str, float], CircuitOpen],
        fail_max: int = 5,
        reset_timeout_s: float = 30.0,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if fail_max < 1:
            raise ValueError("fail_max must be >= 1")
        if reset_timeout_s <= 0 or window_s <= 0:
            raise ValueError("reset_timeout_s and window_s must be > 0")
        self.dependency = dependency
        self.fail_max = fail_max
        self.reset_timeout_s = reset_timeout_s
        self.window_s = window_s
        self._is_failure = is_failure
        self._open_error = open_error
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CLOSED
        self._failures = 0
        self._last_failure = 0.0
        self._opened_at = 0.0
        self._probing = False

    # State ----------------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """closed, open or half-open (open turns half-open here once reset_timeout_s has passed)."""
        with self._lock:
            if self._state == OPEN and self._clock() - self._opened_at >= self.reset_timeout_s:
                self._state = HALF_OPEN
            return self._state

    @property
    def failures(self) -> int:
        with self._lock:
            return self._failures

    def reset(self) -> None:
        """Back to closed with no failures counted (tests, an operator's "try again now")."""
        with self._lock:
            self._state, self._failures, self._probing = CLOSED, 0, False

    def _open(self, now: float) -> None:  # with the lock held
        self._state = OPEN
        self._opened_at = now
        self._probing = False

    # The three steps of one call: acquire, then exactly one of success / failure / neutral ---------
    def acquire(self) -> bool:
        """Let a call through or raise the open error. Returns True when the call is the probe."""
        with self._lock:
            now = self._clock()
            if self._state == OPEN:
                left = self.reset_timeout_s - (now - self._opened_at)
                if left > 0:
                    raise self._open_error(self.dependency, left)
                self._state = HALF_OPEN
            if self._state == HALF_OPEN:
                if self._probing:
                    raise self._open_error(self.dependency, 0.0)
                self._probing = True
                return True
            return False

    def record_success(self, probe: bool = False) -> None:
        with self._lock:
            if probe or self._state == CLOSED:
                self._state, self._failures, self._probing = CLOSED, 0, False

    def record_failure(self, probe: bool = False) -> None:
        with self._lock:
            now = self._clock()
            if probe:
                self._open(now)
            elif self._state == CLOSED:
                if self._failures and now - self._last_failure > self.window_s:
                    self._failures = 0  # the earlier failures were too long ago to be a streak
                self._failures += 1
                self._last_failure = now
                if self._failures >= self.fail_max:
                    self._open(now)
            # open or half-open without being the probe (a call let through earlier): the probe decides

    def record_neutral(self, probe: bool = False) -> None:
        if probe:
            with self._lock:
                self._probing = False

    def record(self, exc: BaseException | None, probe: bool = False) -> None:
        """Classify the outcome of a call that went through (`exc` None: it succeeded)."""
        if exc is None:
            self.record_success(probe)
        elif self._is_failure(exc):
            self.record_failure(probe)
        else:
            self.record_neutral(probe)

    def call(self, fn: Callable[..., T], /, *args: object, **kwargs: object) -> T:
        """`fn(*args, **kwargs)` through the breaker; the lock is not held while `fn` runs."""
        probe = self.acquire()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self.record(exc, probe)
            raise
        self.record_success(probe)
        return result

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.dependency!r}, state={self.state}, failures={self.failures})"
