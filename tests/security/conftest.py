"""Security suite helpers: summaries that the fuzzing and cross-tenant tests leave for the end of the
run (pytest's terminal summary, so they show without -s and are easy to quote)."""

from __future__ import annotations

import pytest

SUMMARIES = pytest.StashKey[dict[str, list[str]]]()


def add_summary(config: pytest.Config, title: str, lines: list[str]) -> None:
    config.stash.setdefault(SUMMARIES, {})[title] = lines


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    for title, lines in config.stash.get(SUMMARIES, {}).items():
        terminalreporter.write_sep("=", title)
        for line in lines:
            terminalreporter.write_line(line)
