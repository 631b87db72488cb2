"""`guest.accept = before_touch`: the Linux guest, which ACCEPTs a page before it touches it.

Its ACCEPT of a page not yet AUGed exits with an EPT violation whose extended exit
qualification (TD_EXIT ``arg1``, kvm_exit's info2) has type ACCEPT (1). The module does not
count those toward zero-step (tdx-reference §5.1), and they all come from one RIP (the TDCALL
of the guest's accept loop): zero_step must leave them out, or every accept loop would read as
an incident.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from zero_step_helpers import Rows

from tdxtrace.codes import TDX_EXT_EXIT_QUAL_TYPE_ACCEPT
from tdxtrace.events import Kind
from tdxtrace.sim.emulator import record
from tdxtrace.sim.guest import ACCEPT_RIP
from tdxtrace.sim.scenario import load_scenario
from tdxtrace.testing import run_analyzer
from tdxtrace.trace import Trace, open_trace
from tdxtrace_plugins.zero_step import ZeroStep

SHORT = "run.duration_us=4000"


def _record(tmp_path: Path, *overrides: str) -> Trace:
    path = tmp_path / "run.arrow"
    record(load_scenario("zero-step", [SHORT, *overrides]), 1, path)
    return open_trace(path)


@pytest.mark.parametrize("policy", ["local_retry", "resume_guest"])
def test_a_linux_guest_never_arms_zero_step_and_zero_step_agrees(
        tmp_path: Path, policy: str) -> None:
    trace = _record(tmp_path, "guest.accept=before_touch", f"policy.frozen_spte={policy}")
    assert trace.summary is not None
    assert trace.summary.truth["zero_step_incidents"] == 0
    exits = trace.observable().filter(pl.col("kind") == Kind.TD_EXIT).collect()
    accept_faults = exits.filter(pl.col("arg1") == TDX_EXT_EXIT_QUAL_TYPE_ACCEPT)
    assert accept_faults.height > 100  # the guest's accepts are what exit
    assert set(accept_faults["rip"].to_list()) == {ACCEPT_RIP}
    metrics = run_analyzer(ZeroStep(), trace).metrics
    assert metrics["incidents"] == 0
    assert metrics["accept_faults"] == accept_faults.height  # said, not silently dropped


def test_without_the_extended_exit_qualification_the_accept_loop_looks_like_incidents(
        tmp_path: Path) -> None:
    # What makes the test above mean something: the same rows, arg1 dropped from the exits.
    trace = _record(tmp_path, "guest.accept=before_touch", "policy.frozen_spte=resume_guest")
    events = trace.events().collect()
    blind = events.with_columns(pl.when(pl.col("kind") == Kind.TD_EXIT).then(None)
                                .otherwise(pl.col("arg1")).alias("arg1"))
    result = run_analyzer(ZeroStep(), Trace.from_frame(blind, trace.metadata))
    assert result.metrics["incidents"] > 0 and result.metrics["max_run"] > 6


def test_the_default_guest_records_no_extended_exit_qualification(tmp_path: Path) -> None:
    trace = _record(tmp_path, "policy.frozen_spte=resume_guest")
    exits = trace.observable().filter(pl.col("kind") == Kind.TD_EXIT).collect()
    assert exits["arg1"].null_count() == exits.height
    assert trace.summary is not None and trace.summary.truth["zero_step_incidents"] > 0


@pytest.mark.parametrize(("arg1", "incidents"), [
    (TDX_EXT_EXIT_QUAL_TYPE_ACCEPT, 0),  # the ACCEPT's violations: not counted
    (TDX_EXT_EXIT_QUAL_TYPE_ACCEPT | 1 << 32, 0),  # a 2M accept: info bits do not matter
    (None, 1),  # not recorded: counted, as before the column existed
    (6, 1),  # PENDING_EPT_VIOLATION: an access, counted
])
def test_seven_faults_at_one_rip_count_unless_the_accept_caused_them(
        arg1: int | None, incidents: int) -> None:
    rows = Rows()
    for page in range(7):  # an accept loop: one RIP, a new page each time
        rows.exit(0, rip=ACCEPT_RIP, gpa=0x7000 + (page << 12), ext_qual=arg1)
    assert rows.analyze().metrics["incidents"] == incidents


def test_readme_session_linux_guest_line(tmp_path: Path) -> None:
    # README, "A typical session": seed 2 under resume_guest arms zero-step twice with the
    # default guest, never with the Linux one.
    for accept, incidents in (("lazy", 2), ("before_touch", 0)):
        path = tmp_path / f"{accept}.arrow"
        record(load_scenario("zero-step", ["policy.frozen_spte=resume_guest",
                                           f"guest.accept={accept}"]), 2, path)
        result = run_analyzer(ZeroStep(), open_trace(path))
        assert result.metrics["incidents"] == incidents, accept


def test_a_mapgpa_between_accepts_is_not_made_from_the_accept_rip(tmp_path: Path) -> None:
    # The guest's MapGPA is its own TDCALL: its exits must not carry the ACCEPT's RIP, though
    # it may come right after an ACCEPT exit was resolved.
    path = tmp_path / "convert.arrow"
    record(load_scenario("mapgpa-convert", [SHORT, "guest.accept=before_touch"]), 1, path)
    exits = open_trace(path).observable().filter(pl.col("kind") == Kind.TD_EXIT).collect()
    tdcalls = exits.filter(pl.col("exit_reason") == 77)  # TDG.VP.VMCALL
    assert tdcalls.height > 0
    assert ACCEPT_RIP not in tdcalls["rip"].to_list()
