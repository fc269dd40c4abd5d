"""bench/common.py: a child's RESULT line comes back as a dict, a failed child as its error output."""

from __future__ import annotations

import sys

import pytest


def test_run_child_reads_the_result_line(load_bench):
    common = load_bench("common")
    child = "from common import report_result; print('loading...'); report_result({'rows': 3, 'ok': True})"
    result, error = common.run_child([sys.executable, "-c", f"import sys; sys.path[:0] = {sys.path!r}; {child}"])
    assert (result, error) == ({"rows": 3, "ok": True}, "")


def test_run_child_gives_the_error_of_a_failed_child(load_bench):
    common = load_bench("common")
    result, error = common.run_child([sys.executable, "-c", "raise SystemExit('no model here')"])
    assert result is None and error.strip() == "no model here"
    result, error = common.run_child([sys.executable, "-c", "print('done, but no result line')"])
    assert result is None and error.strip() == "done, but no result line"  # stdout where stderr is empty


def test_seed_stats(load_bench):
    common = load_bench("common")
    s = common.seed_stats([{"accuracy": a} for a in (0.90, 0.92, 0.91)], "accuracy")
    assert s["mean"] == pytest.approx(0.91) and s["std"] == pytest.approx(0.01) and (s["min"], s["max"]) == (0.9, 0.92)
    assert common.seed_stats([{"accuracy": 0.9}], "accuracy")["std"] is None  # no spread from one seed
