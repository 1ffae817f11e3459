"""A pytest plugin that appends each test's outcome to a JSON-lines file as soon as it is known.

bench/gpu_check.py loads it (``-p pytest_results``, with ``$GPT2_PYTEST_RESULTS`` naming the file)
so that a test run stopped at its time limit still leaves the outcomes of the tests it finished.
One line per test and phase: {"test", "when", "outcome", "properties"}; ``properties`` are what
the test gave ``record_property``.
"""

from __future__ import annotations

import json
import os

import pytest

RESULTS_ENV = "GPT2_PYTEST_RESULTS"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    path = os.environ.get(RESULTS_ENV)
    if not path:
        return
    line = {
        "test": report.nodeid.split("::", 1)[-1],
        "when": report.when,
        "outcome": report.outcome,  # passed, failed or skipped
        "properties": {k: str(v) for k, v in report.user_properties},
    }
    if report.failed:
        line["error"] = str(report.longrepr)[-2000:]
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
