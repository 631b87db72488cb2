"""Each analyzer, reading observable rows only, agrees with the emulator's ground truth.

For every built-in scenario and several seeds, the figures below are fully determined by
observable events, so they must equal the truth counters exactly. Figures that observable
events cannot determine are measured separately (precision/recall) in the analyzers' notes
and in the README.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    ("busy_retry", "interrupted_resumable"): "cache_wb_resumes",
    ("zap_scope", "sptes_zapped"): "sptes_zapped",
    ("zap_scope", "private_zaps_unexpected"): "private_zaps_unexpected",
    ("zap_scope", "vms_bugged"): "vms_bugged",
    ("zap_scope", "memory_fault_exits"): "memory_fault_exits",
    ("teardown_latency", "teardowns"): "teardowns",
    ("teardown_latency", "hkid_leaks"): "hkid_leaks",
    ("teardown_latency", "pages_leaked"): "teardown_pages_leaked",
    ("mapgpa", "conversions"): "mapgpa_conversions",
    ("mapgpa", "retries"): "mapgpa_retries",
    ("mapgpa", "giveups"): "mapgpa_giveups",
    ("mapgpa", "bad_r11_endings"): "mapgpa_bad_r11",
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
    "zap-under-load": ("busy_total", "sptes_zapped", "memory_fault_exits"),
    "zero-step": ("zero_step_incidents", "synthesized_exits"),
}


def _short(name: str) -> list[str]:
    # Long-running stories are cut short; teardown-sized ones keep their own size.
    return [] if name in ("teardown",) else SHORT


def _mismatches(outcomes: dict[str, Any], truth: dict[str, Any]) -> list[str]:
    """Each EXACT figure that differs from its truth counter, as ``analyzer.metric = x, ...``."""
    mismatches = []
    for (analyzer, metric), truth_key in sorted(EXACT.items()):
        result = outcomes[analyzer].result
        assert result is not None, f"{analyzer}: {outcomes[analyzer].error}"
        got, want = result.metrics.get(metric), truth.get(truth_key)
        if got != want:
            mismatches.append(f"{analyzer}.{metric} = {got}, truth {truth_key} = {want}")
    return mismatches


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
    mismatches = _mismatches(outcomes, summary.truth)
    assert not mismatches, f"{name} seed {seed}: " + "; ".join(mismatches)
    quiet = [key for key in STORY.get(name, ()) if not summary.truth.get(key)]
    assert not quiet, f"{name} seed {seed}: nothing happened for {quiet}"


# Policies and fault injections the built-in scenarios leave at their defaults: the same
# figures must still equal the truth (one of these caught resent VPFLUSHDONEs counted as
# leaks). Each names the truth counters its story needs to be non-zero.
TEARDOWN_RACE = ["td.memory_mb=8", "teardown.vpflushdone_tries=3",
                 "faults.vcpu_load_during_teardown_p=1.0"]
VARIANTS: dict[str, tuple[str, list[str], tuple[str, ...]]] = {
    "remove-busy-leaks-pages": ("teardown", ["td.count=1", "td.memory_mb=4",
                                             "faults.spurious_busy_leaf=mem.page.remove",
                                             "faults.spurious_busy_p=0.2"],
                                ("teardown_pages_leaked", "vms_bugged")),
    "reclaim-busy-early": ("teardown", ["td.memory_mb=8", "policy.hkid_release=early",
                                        "faults.spurious_busy_leaf=phymem.page.reclaim",
                                        "faults.spurious_busy_p=0.05"],
                           ("teardown_pages_leaked",)),
    "resend-flush-recovers": ("teardown", [*TEARDOWN_RACE, "teardown.flush_loop=resend_flush"],
                              ("teardown_vcpu_reloads", "teardowns_finished")),
    "vpflushdone-only-leaks": ("teardown",
                               [*TEARDOWN_RACE, "teardown.flush_loop=vpflushdone_only"],
                               ("teardown_vcpu_reloads", "hkid_leaks")),
    "early-hkid-release": ("teardown", ["td.memory_mb=8", "policy.hkid_release=early"],
                           ("teardowns_finished",)),
    "zero-step-local-retry": ("zero-step", ["policy.frozen_spte=local_retry"],
                              ("local_retries",)),
    "zap-retry-loop": ("zap-under-load", [*SHORT, "policy.zap_busy=retry_loop"],
                       ("busy_total",)),
    "zap-spinlock": ("zap-under-load", [*SHORT, "policy.zap_busy=seamcall_spinlock"],
                     ("vms_bugged",)),
    "zap-everything": ("memslot-churn", [*SHORT, "policy.zap_scope=everything"],
                       ("sptes_zapped",)),
    "mapgpa-partial": ("mapgpa-convert", [*SHORT, "mapgpa.vmm=partial"], ("mapgpa_retries",)),
    "mapgpa-no-progress": ("mapgpa-convert", [*SHORT, "mapgpa.vmm=no_progress"],
                           ("mapgpa_giveups",)),
    "mapgpa-bad-r11": ("mapgpa-convert", [*SHORT, "mapgpa.vmm=bad_r11"],
                       ("mapgpa_retries", "mapgpa_bad_r11")),
    # The Linux guest: ACCEPT before touch, so its faults are the ACCEPT's (never zero-step).
    "linux-guest-demo": ("demo", ["guest.accept=before_touch", "policy.frozen_spte=resume_guest"],
                         ("faults", "mapgpa_conversions", "teardowns")),
    "linux-guest-convert": ("mapgpa-convert", [*SHORT, "guest.accept=before_touch"],
                            ("mapgpa_conversions", "mapgpa_retries")),
    # Timer handlers that exit (TDVMCALL<WRMSR> at their own RIP): never taken for a MapGPA,
    # and zero-step still arms where KVM resumes the guest on a frozen SPTE.
    "tick-exit-convert": ("mapgpa-convert", [*SHORT, "guest.tick_exit=tdvmcall"],
                          ("mapgpa_conversions", "mapgpa_retries")),
    # A preemptible host: conversion zaps yield mmu_lock to waiting faults between leaves.
    "zap-preempt-full": ("zap-under-load", [*SHORT, "kvm.preempt_model=full"],
                         ("zap_yields", "busy_total")),
    "tick-exit-resume-guest": ("zero-step", ["guest.tick_exit=tdvmcall", "kvm.preempt_p=0.4"],
                               ("zero_step_incidents",)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_analyzers_equal_truth_under_other_policies(
        tmp_path: Path, analyzers: list, variant: str) -> None:  # type: ignore[type-arg]
    name, overrides, story = VARIANTS[variant]
    path = tmp_path / f"{variant}.arrow"
    summary = record(load_scenario(name, overrides), 5, path)
    outcomes = {o.name: o for o in run_analyzers(open_trace(path), analyzers)}
    mismatches = _mismatches(outcomes, summary.truth)
    assert not mismatches, f"{variant}: " + "; ".join(mismatches)
    quiet = [key for key in story if not summary.truth.get(key)]
    assert not quiet, f"{variant}: nothing happened for {quiet}"
