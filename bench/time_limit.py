"""A per-test time limit for pytest without pytest-timeout: ``python -m pytest -p time_limit --time-limit 60``.

(bench/ on PYTHONPATH.) A test whose setup, call or teardown runs longer than the limit (wall time) fails with
`TimeLimitExceeded` and the session goes on with the next test. SIGALRM interrupts Python code at once, but a
C call or a CUDA synchronisation that never returns only sees it when control comes back to Python, so
bench/gpu_run.py also runs each test file in a subprocess with a hard timeout.
"""

from __future__ import annotations

import signal
from collections.abc import Generator

import pytest


class TimeLimitExceeded(Exception):
    """A test phase ran past --time-limit."""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--time-limit",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="fail a test whose setup, call or teardown takes longer than this (0: no limit)",
    )


def _limited(item: pytest.Item, phase: str) -> Generator[None, None, None]:
    limit = item.config.getoption("time_limit")
    if limit <= 0:
        yield
        return

    def expire(_signum, _frame):
        raise TimeLimitExceeded(f"{item.nodeid} {phase} ran past its time limit of {limit:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    yield from _limited(item, "setup")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    yield from _limited(item, "call")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    yield from _limited(item, "teardown")
