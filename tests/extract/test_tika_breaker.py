"""The Tika endpoint's circuit breaker, against the loopback Tika stub of test_extract.py (the file's
bytes name the stub's scenario: "busy" answers 503, "pdf3" a good 3-page result, "corrupt" a 422)."""

from __future__ import annotations

import pickle
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.extract import ExtractionError, Limits, extract, tika_backend
from appliance.extract.tika_backend import TikaCircuitOpen, breaker_for, reset_breakers
from appliance.resilience import CLOSED, OPEN, CircuitOpen
from tests.extract.test_extract import _TikaStub, tika_stub  # noqa: F401 - the stub server fixture

PDF = "application/pdf"


@pytest.fixture(autouse=True)
def fresh_breakers(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    reset_breakers()
    monkeypatch.setattr(tika_backend, "FAIL_MAX", 3)
    monkeypatch.setattr(tika_backend, "RESET_TIMEOUT_S", 0.3)
    yield
    reset_breakers()


def send(tmp_path: Path, endpoint: str, scenario: str) -> object:
    path = tmp_path / f"{scenario}.bin"
    path.write_bytes(scenario.encode())
    return extract(path, PDF, tika_endpoint=endpoint, limits=Limits(timeout_s=5))


def code_of(tmp_path: Path, endpoint: str, scenario: str) -> ExtractionError:
    with pytest.raises(ExtractionError) as caught:
        send(tmp_path, endpoint, scenario)
    return caught.value


def test_busy_tika_opens_the_circuit_then_fails_fast_without_a_request(
    tmp_path: Path,
    tika_stub: str,  # noqa: F811
) -> None:
    for _ in range(3):
        assert code_of(tmp_path, tika_stub, "busy").code == "backend_unavailable"
    breaker = breaker_for(tika_stub)
    assert breaker.state == OPEN
    requests_before = len(_TikaStub.seen)
    started = time.perf_counter()
    error = code_of(tmp_path, tika_stub, "pdf3")
    elapsed = time.perf_counter() - started
    assert len(_TikaStub.seen) == requests_before  # nothing was sent
    assert elapsed < 0.05
    assert isinstance(error, TikaCircuitOpen) and isinstance(error, CircuitOpen)
    assert (error.code, error.permanent) == ("backend_unavailable", False)
    assert f"Tika server at {tika_stub}" in error.message and "next try in" in error.message
    revived = pickle.loads(pickle.dumps(error))
    assert (revived.code, revived.permanent) == ("backend_unavailable", False)

    time.sleep(0.31)  # half-open: the next call is the probe
    assert [p.number for p in send(tmp_path, tika_stub, "pdf3").pages] == [1, 2, 3]  # type: ignore[attr-defined]
    assert len(_TikaStub.seen) == requests_before + 1
    assert breaker.state == CLOSED


def test_failed_probe_reopens(tmp_path: Path, tika_stub: str) -> None:  # noqa: F811
    for _ in range(3):
        code_of(tmp_path, tika_stub, "busy")
    time.sleep(0.31)
    probe = code_of(tmp_path, tika_stub, "busy")
    assert not isinstance(probe, CircuitOpen) and probe.code == "backend_unavailable"
    assert isinstance(code_of(tmp_path, tika_stub, "pdf3"), TikaCircuitOpen)


def test_document_errors_do_not_count(tmp_path: Path, tika_stub: str) -> None:  # noqa: F811
    for _ in range(5):
        assert code_of(tmp_path, tika_stub, "corrupt").code == "corrupt_file"
        assert code_of(tmp_path, tika_stub, "unsupported").code == "unsupported_type"
        assert code_of(tmp_path, tika_stub, "crash").code == "extractor_crashed"
    breaker = breaker_for(tika_stub)
    assert (breaker.state, breaker.failures) == (CLOSED, 0)


def test_unreachable_tika_opens_the_circuit_per_endpoint(tmp_path: Path, tika_stub: str) -> None:  # noqa: F811
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    for _ in range(3):
        error = code_of(tmp_path, closed, "pdf3")
        assert error.code == "backend_unavailable" and not isinstance(error, CircuitOpen)
    assert isinstance(code_of(tmp_path, closed + "/", "pdf3"), TikaCircuitOpen)  # same endpoint
    assert breaker_for(tika_stub).state == CLOSED  # another endpoint is unaffected
    assert send(tmp_path, tika_stub, "pdf3")
