"""TD_EXIT's exit qualification (arg0, kvm_exit's info1) for EPT violations, and PAGE_FAULT's.

Hardware reports a guest write to an unmapped page as 0x182 (write, linear address valid and
translated); the module's zero-step exit is write access alone (0x2,
emulate_ept_violation_td_exit() in its source); an EPT violation the guest's ACCEPT caused
carries 0, its type in the extended qualification (arg1). KVM's PAGE_FAULT row has the
qualification KVM uses: forced to write on private GPAs, the hardware's on shared ones.
"""

from __future__ import annotations

import polars as pl
from emulator_helpers import run

from tdxtrace.codes import (
    EXIT_QUAL_GUEST_WRITE,
    EXIT_QUAL_ZERO_STEP,
    TDX_EXT_EXIT_QUAL_TYPE_ACCEPT,
    ExitReason,
)
from tdxtrace.events import Kind

SHARED_BIT = 1 << 47
EPT = int(ExitReason.EPT_VIOLATION)


def _ept_exits(events: pl.DataFrame) -> pl.DataFrame:
    return events.filter((pl.col("kind") == Kind.TD_EXIT) & (pl.col("exit_reason") == EPT))


def test_synthesized_exits_carry_the_zero_step_qualification() -> None:
    events, truth = run("zero-step", "policy.frozen_spte='resume_guest'", seed=3)
    exits = _ept_exits(events)
    synthesized = exits.filter(pl.col("arg0") == EXIT_QUAL_ZERO_STEP)
    assert synthesized.height == truth["synthesized_exits"] >= 5
    # Each one follows its truth row on the same vCPU and GPA.
    marks = events.filter(pl.col("kind") == Kind.T_SYNTHESIZED_EXIT).select(
        "vcpu", "gpa", mark="seq")
    paired = synthesized.join_asof(marks.sort("mark"), left_on="seq", right_on="mark",
                                   by="vcpu", strategy="backward")
    assert (paired["gpa"] == paired["gpa_right"]).all()
    real = exits.filter(pl.col("arg0") != EXIT_QUAL_ZERO_STEP)
    assert real.height + synthesized.height == exits.height
    assert real["arg0"].to_list() == [EXIT_QUAL_GUEST_WRITE] * real.height


def test_an_accept_caused_violation_has_qualification_zero() -> None:
    events, _ = run("zero-step", "guest.accept='before_touch'", "run.duration_us=3000")
    exits = _ept_exits(events)
    accept = exits.filter(pl.col("arg1") == TDX_EXT_EXIT_QUAL_TYPE_ACCEPT)
    assert accept.height >= 10 and accept["arg0"].to_list() == [0] * accept.height
    others = exits.filter(pl.col("arg1").is_null())
    assert others["arg0"].to_list() == [EXIT_QUAL_GUEST_WRITE] * others.height


def test_kvm_forces_write_on_private_faults_and_keeps_the_hardwares_on_shared() -> None:
    events, _ = run("memslot-churn", "run.duration_us=3000")
    faults = events.filter(pl.col("kind") == Kind.PAGE_FAULT)
    shared = faults.filter(pl.col("gpa") & SHARED_BIT != 0)
    private = faults.filter(pl.col("gpa") & SHARED_BIT == 0)
    assert shared.height >= 5 and private.height >= 5
    assert shared["arg0"].to_list() == [EXIT_QUAL_GUEST_WRITE] * shared.height
    assert private["arg0"].to_list() == [EXIT_QUAL_ZERO_STEP] * private.height  # ACC_WRITE
    # A shared fault's PAGE_FAULT repeats its TD_EXIT's qualification.
    shared_exits = _ept_exits(events).filter(pl.col("gpa") & SHARED_BIT != 0)
    assert shared_exits["arg0"].to_list() == [EXIT_QUAL_GUEST_WRITE] * shared_exits.height
