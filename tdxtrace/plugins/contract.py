"""What tdxtrace reads from an analyzer besides its results: its class attributes, checked.

The CLI and the report read an analyzer's ``name``, ``description``, ``version``,
``columns``, ``key_metrics``, ``thresholds`` and ``template``. Any of them may be a property,
so reading it runs plugin code, which may raise or return the wrong type. They are all read and
checked once when the plugin registers the analyzer (:func:`check_analyzer`): a bad one fails
that plugin alone, named, before any analysis. Code handed analyzers some other way (the
report's library API) reads them through :func:`describe_analyzer` and contains its error.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tdxtrace.analysis import ANALYZER_NAME, Analyzer, guarded
from tdxtrace.schema import COLUMN_NAMES


@dataclass(frozen=True)
class AnalyzerInfo:
    """An analyzer's class attributes, read once and checked (see :func:`describe_analyzer`)."""

    name: str
    description: str
    version: str
    columns: tuple[str, ...]
    key_metrics: tuple[str, ...]
    thresholds: dict[str, tuple[float, float]]
    template: str | None


def _attribute(analyzer: Analyzer, attr: str, default: Any) -> Any:
    # A plugin's attribute may be a property: reading it runs plugin code, guarded as an
    # analysis is (analysis.guarded: the user's Ctrl-C still stops the command). Missing
    # (AttributeError) means the default, as the base class would give.
    value, error = guarded(lambda: getattr(analyzer, attr, default))
    if error is not None:
        raise TypeError(f"{type(analyzer).__name__}.{attr} cannot be read: {error}")
    return value


def _strings(analyzer: Analyzer, attr: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, tuple | list) or \
            not all(isinstance(v, str) for v in value):
        raise TypeError(f"{type(analyzer).__name__}.{attr} must be a tuple of str, got "
                        f"{type(value).__name__}")
    return tuple(value)


def _limits(analyzer: Analyzer, value: Any) -> dict[str, tuple[float, float]]:
    where = f"{type(analyzer).__name__}.thresholds"
    if not isinstance(value, Mapping):
        raise TypeError(f"{where} must be a dict, got {type(value).__name__}")
    out: dict[str, tuple[float, float]] = {}
    for metric, limits in value.items():
        pair = tuple(limits) if isinstance(limits, tuple | list) else ()
        if not isinstance(metric, str) or len(pair) != 2 or any(
                isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
                for v in pair):
            raise TypeError(f"{where}[{metric!r}] must be (warn_at, fail_at), two finite "
                            f"numbers; got {limits!r}")
        out[metric] = (float(pair[0]), float(pair[1]))
    return out


def describe_analyzer(analyzer: Analyzer) -> AnalyzerInfo:
    """Read and check every attribute tdxtrace reads from an analyzer (the CLI, the report).

    A TypeError names the class and the attribute that is missing, mistyped or raises: so a
    plugin's bad attribute fails that plugin when it loads, not the command later.
    """
    name = _attribute(analyzer, "name", None)
    if not isinstance(name, str) or not ANALYZER_NAME.match(name):
        raise TypeError(f"{type(analyzer).__name__}.name {name!r} is not a snake_case name")
    description = _attribute(analyzer, "description", "")
    version = _attribute(analyzer, "version", "")
    template = _attribute(analyzer, "template", None)
    if not isinstance(description, str):
        raise TypeError(f"{type(analyzer).__name__}.description must be str, got "
                        f"{type(description).__name__}")
    if isinstance(version, bool) or not isinstance(version, str | int):
        raise TypeError(f"{type(analyzer).__name__}.version must be str, got "
                        f"{type(version).__name__}")
    if template is not None and not isinstance(template, str | os.PathLike):
        raise TypeError(f"{type(analyzer).__name__}.template must be a str path or None, "
                        f"got {type(template).__name__}")
    return AnalyzerInfo(
        name=name, description=description, version=str(version),
        columns=_strings(analyzer, "columns", _attribute(analyzer, "columns", COLUMN_NAMES)),
        key_metrics=_strings(analyzer, "key_metrics",
                             _attribute(analyzer, "key_metrics", ())),
        thresholds=_limits(analyzer, _attribute(analyzer, "thresholds", {})),
        template=os.fspath(template) if template else None)


def check_analyzer(analyzer: object, plugin: str) -> Analyzer:
    """``analyzer`` if it is a usable Analyzer instance, else a TypeError naming the class."""
    if not isinstance(analyzer, Analyzer):
        raise TypeError(f"register_analyzers returned {type(analyzer).__name__}, "
                        "expected tdxtrace.analysis.Analyzer instances")
    describe_analyzer(analyzer)
    return analyzer
