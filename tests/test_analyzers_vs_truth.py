"""Each analyzer, reading observable rows only, agrees with the emulator's ground truth.

For every built-in scenario and several seeds, the figures below are fully determined by
observable events, so they must equal the truth counters exactly. Figures that observable
events cannot determine are measured separately (precision/recall) in the analyzers' notes
and in the README.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tdxtrace.analysis import run_analyzers
from tdxtrace.plugins import load_analyzers, make_plugin_manager
from tdxtrace.sim.emulator import record
from tdxtrace.sim.scenario import builtin_names, load_scenario
from tdxtrace.trace import open_trace

# (analyzer, metric) -> truth counter
EXACT = {
    ("zero_step", "incidents"): "zero_step_incidents",
    ("zero_step", "synthesized_exits"): "synthesized_exits",
    ("zap_scope", "refaults"): "refaults",
    ("busy_retry", "busy_total"): "busy_total",
    ("zap_scope", "sptes_zapped"): "sptes_zapped",
    ("zap_scope", "private_zaps_unexpected"): "private_zaps_unexpected",
    ("zap_scope", "vms_bugged"): "vms_bugged",
    ("teardown_latency", "teardowns"): "teardowns",
    ("teardown_latency", "hkid_leaks"): "hkid_leaks",
    ("mapgpa", "conversions"): "mapgpa_conversions",
    ("mapgpa", "retries"): "mapgpa_retries",
    ("mapgpa", "giveups"): "mapgpa_giveups",
}
SHORT = ["run.duration_us=6000"]
# What each story is about must actually happen, or the comparison above proves nothing.
STORY = {
    "demo": ("zero_step_incidents", "mapgpa_conversions", "teardowns", "busy_total"),
    "fault-storm": ("faults", "zaps", "local_retries"),
    "mapgpa-convert": ("mapgpa_conversions", "mapgpa_retries"),
    "memslot-churn": ("sptes_zapped",),
    "migration": ("migrations",),
    "teardown": ("teardowns",),
    "zap-under-load": ("busy_total", "sptes_zapped"),
    "zero-step": ("zero_step_incidents", "synthesized_exits"),
}


def _short(name: str) -> list[str]:
    # Long-running stories are cut short; teardown-sized ones keep their own size.
    return [] if name in ("teardown",) else SHORT


@pytest.fixture(scope="module")
def analyzers() -> list:  # type: ignore[type-arg]
    loaded = load_analyzers(make_plugin_manager())
    assert not loaded.failed, loaded.failed
    return loaded.analyzers


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("name", builtin_names())
def test_analyzers_equal_truth(tmp_path: Path, analyzers: list, name: str,  # type: ignore[type-arg]
                               seed: int) -> None:
    path = tmp_path / f"{name}-{seed}.arrow"
    summary = record(load_scenario(name, _short(name)), seed, path)
    trace = open_trace(path)
    outcomes = {o.name: o for o in run_analyzers(trace, analyzers)}
    for outcome in outcomes.values():
        assert outcome.error is None, f"{outcome.name}: {outcome.error}"
    mismatches = []
    for (analyzer, metric), truth_key in sorted(EXACT.items()):
        result = outcomes[analyzer].result
        assert result is not None
        got, want = result.metrics.get(metric), summary.truth.get(truth_key)
        if got != want:
            mismatches.append(f"{analyzer}.{metric} = {got}, truth {truth_key} = {want}")
    assert not mismatches, f"{name} seed {seed}: " + "; ".join(mismatches)
    quiet = [key for key in STORY.get(name, ()) if not summary.truth.get(key)]
    assert not quiet, f"{name} seed {seed}: nothing happened for {quiet}"
