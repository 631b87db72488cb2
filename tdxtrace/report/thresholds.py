"""ok / warn / fail marks: each analyzer's thresholds, overridable from the command line.

The rule (also printed in every report): for a metric with limits ``(warn_at, fail_at)``, the
mark is **fail** when ``value >= fail_at``, **warn** when ``value >= warn_at``, **ok** otherwise.
An analyzer's mark is the worst mark of its metrics (ok when it has no thresholds), and an
analyzer that failed, or whose section could not be rendered, is marked **fail**.

``--threshold ANALYZER.METRIC=WARN:FAIL`` replaces (or adds) one metric's limits.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

from tdxtrace.errors import TdxtraceError
from tdxtrace.report.formatting import format_float, format_int

Limits = tuple[float, float]
ThresholdTable = Mapping[str, Mapping[str, Limits]]  # analyzer -> metric -> (warn_at, fail_at)

OK, WARN, FAIL, NONE = "ok", "warn", "fail", ""
_SEVERITY = {NONE: 0, OK: 1, WARN: 2, FAIL: 3}

THRESHOLD_RULE = (
    "A metric with limits (warn_at, fail_at) is marked fail when value ≥ fail_at, warn when "
    "value ≥ warn_at, ok otherwise. An analyzer's mark is its worst metric's (ok without "
    "thresholds); an analyzer that failed is marked fail. Override limits with "
    "--threshold ANALYZER.METRIC=WARN:FAIL."
)

_SPEC = re.compile(r"^(?P<analyzer>[^.=\s]+)\.(?P<metric>[^=\s]+)=(?P<warn>[^:]+):(?P<fail>.+)$")


def _finite(text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise TdxtraceError(f"--threshold {spec!r}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise TdxtraceError(f"--threshold {spec!r}: {text!r} is not a finite number")
    return value


def parse_threshold(spec: str) -> tuple[str, str, Limits]:
    """``"busy_retry.busy_total=10:100"`` -> ``("busy_retry", "busy_total", (10.0, 100.0))``."""
    match = _SPEC.match(spec.strip())
    if match is None:
        raise TdxtraceError(
            f"--threshold {spec!r}: expected ANALYZER.METRIC=WARN:FAIL, e.g. "
            "busy_retry.busy_total=10:100")
    warn = _finite(match["warn"], spec)
    fail = _finite(match["fail"], spec)
    if warn > fail:
        raise TdxtraceError(f"--threshold {spec!r}: WARN ({match['warn']}) is above FAIL "
                            f"({match['fail']})")
    return match["analyzer"], match["metric"], (warn, fail)


def parse_thresholds(specs: Iterable[str]) -> dict[str, dict[str, Limits]]:
    """Several ``--threshold`` options as a table; a later option for a metric wins."""
    table: dict[str, dict[str, Limits]] = {}
    for spec in specs:
        analyzer, metric, limits = parse_threshold(spec)
        table.setdefault(analyzer, {})[metric] = limits
    return table


def effective_limits(own: Mapping[str, Limits], name: str,
                     overrides: ThresholdTable | None) -> dict[str, Limits]:
    """An analyzer's own thresholds with the overrides for ``name`` applied, sorted by metric."""
    limits: dict[str, Limits] = {k: (float(w), float(f)) for k, (w, f) in own.items()}
    if overrides:
        limits.update({k: (float(w), float(f)) for k, (w, f) in overrides.get(name, {}).items()})
    return dict(sorted(limits.items()))


def mark_for(value: float, limits: Limits | None) -> str:
    """The mark of one value; NONE when the metric has no limits."""
    if limits is None:
        return NONE
    warn_at, fail_at = limits
    if value >= fail_at:
        return FAIL
    if value >= warn_at:
        return WARN
    return OK


def worst(marks: Iterable[str]) -> str:
    """The most severe of ``marks``; OK when none is set."""
    result = OK
    for mark in marks:
        if _SEVERITY[mark] > _SEVERITY[result]:
            result = mark
    return result


def limit_text(value: float) -> str:
    return format_int(int(value)) if float(value).is_integer() else format_float(value)


def limits_text(limits: Limits | None) -> str:
    """``"warn ≥ 10 · fail ≥ 100"``, or ``""`` without limits."""
    if limits is None:
        return ""
    return f"warn ≥ {limit_text(limits[0])} · fail ≥ {limit_text(limits[1])}"
