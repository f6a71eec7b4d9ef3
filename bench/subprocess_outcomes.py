"""What bench/gpu_run.py keeps of each subprocess it runs: the outcome, the run log, the summary rows, and
what a pytest report or a crash's output says (its counts, the line that names the failure)."""

from __future__ import annotations

import threading
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Row:
    """One line of the summary: a step (or one file of it), how it ended, and why or with what figures."""

    step: str
    what: str
    status: str  # "ok", "failed", "timed out" or "skipped"
    seconds: float = 0.0
    why: str = ""
    data: dict = field(default_factory=dict)


@dataclass
class Outcome:
    """A finished subprocess: its exit status (None: killed at its time limit), time and output."""

    returncode: int | None
    seconds: float
    output: str
    limit: float


class RunLog:
    """run.log: each subprocess's command, exit status, time and output, one section after another."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        path.write_text("")

    def add(self, title: str, command: list[str], outcome: Outcome) -> None:
        status = "killed at its time limit" if outcome.returncode is None else f"exit {outcome.returncode}"
        with self.lock, self.path.open("a") as log:
            log.write(
                f"===== {title}: {status}, {outcome.seconds:.1f} s of {outcome.limit:.0f} s\n"
                f"$ {' '.join(command)}\n{outcome.output}\n"
            )


def last_error_line(output: str) -> str:
    """The line that says what went wrong: the last exception-looking line, else the last non-empty one."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Exceeded", "Interrupt")) or line.startswith(("FAILED", "ERROR")):
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def failure_reason(outcome: Outcome) -> str:
    if outcome.returncode is None:
        return f"killed at its time limit of {outcome.limit:.0f} s"
    return f"exit {outcome.returncode}: {last_error_line(outcome.output)}"


def junit_counts(path: Path) -> dict:
    """Counts of a pytest --junitxml report: passed, failed, errors, skipped, the failures and the skip reasons."""
    cases = ET.parse(path).getroot().iter("testcase")
    counts: dict = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "skip_reasons": Counter()}
    for case in cases:
        name = case.get("name", "?")
        failure, error, skipped = case.find("failure"), case.find("error"), case.find("skipped")
        if failure is not None or error is not None:
            counts["failed" if failure is not None else "errors"] += 1
            element = failure if failure is not None else error
            message = (element.get("message") or "").strip().splitlines()
            counts["failures"].append(f"{name}: {message[0][:200] if message else element.tag}")
        elif skipped is not None:
            counts["skipped"] += 1
            counts["skip_reasons"][(skipped.get("message") or "").strip()[:120]] += 1
        else:
            counts["passed"] += 1
    counts["skip_reasons"] = dict(counts["skip_reasons"])
    return counts


def describe_counts(counts: dict) -> str:
    text = (
        f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, {counts['skipped']} skipped"
    )
    if counts["failures"]:
        text += "; " + "; ".join(counts["failures"][:3]) + (" ..." if len(counts["failures"]) > 3 else "")
    if counts["skip_reasons"]:
        text += " (skipped: " + "; ".join(f"{n}x {why}" for why, n in counts["skip_reasons"].items()) + ")"
    return text


def pytest_row(step: str, what: str, outcome: Outcome, junit: Path) -> Row:
    """A row for one pytest subprocess: its counts when it wrote its report, else why it did not."""
    counts = junit_counts(junit) if junit.is_file() else None
    if outcome.returncode is None:
        status, why = "timed out", failure_reason(outcome)
    elif outcome.returncode == 5:
        status, why = "skipped", "no test selected"
    elif counts is None:
        status, why = "failed", failure_reason(outcome)
    else:
        bad = counts["failed"] or counts["errors"] or outcome.returncode != 0
        status, why = ("failed" if bad else "ok"), describe_counts(counts)
    return Row(step, what, status, outcome.seconds, why, {"counts": counts, "returncode": outcome.returncode})
