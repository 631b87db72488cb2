"""The emulator reproduces the behaviour tdx-reference.md documents (issue 3, item 9)."""

from __future__ import annotations

import polars as pl
import pytest
from emulator_helpers import run

from tdxtrace.codes import EXIT_REASON_INVALID, Leaf, OperandId, Status, with_operand
from tdxtrace.events import FaultOutcome, KickReason, Kind, RetryCause, SeptState
from tdxtrace.sim.module import TdxModule
from tdxtrace.sim.module_state import ModuleTd, ModuleVcpu

BUSY_SEPT = with_operand(int(Status.OPERAND_BUSY), OperandId.SEPT_TREE)
BUSY_EPOCH = with_operand(int(Status.OPERAND_BUSY), OperandId.TD_EPOCH)

# Four vCPUs hammer one page; whoever freezes its SPTE is preempted for 200 µs.
CONTENDED = ("td.vcpus=4", "guest.workload='hot'", "guest.hot_pages=1", "guest.hot_fraction=1.0",
             "kvm.preempt_p=1.0", "kvm.preempt_ns=200000", "vmm.zap_interval_us=0",
             "run.duration_us=2000")


def test_resume_guest_arms_zero_step_after_exactly_six_faults_at_one_rip() -> None:
    events, truth = run("zero-step", *CONTENDED, "policy.frozen_spte='resume_guest'")
    armed = events.filter(pl.col("kind") == Kind.T_ZERO_STEP_ARMED)
    assert truth["zero_step_incidents"] == armed.height >= 1
    first = armed.row(0, named=True)
    exits_before = events.filter(
        (pl.col("kind") == Kind.TD_EXIT) & (pl.col("exit_reason") == 48)
        & (pl.col("vcpu") == first["vcpu"]) & (pl.col("rip") == first["rip"])
        & (pl.col("seq") < first["seq"]))
    assert exits_before.height == 5  # the arming exit itself is the 6th
    after = events.filter(pl.col("seq") > first["seq"])
    synthesized = after.filter(pl.col("kind") == Kind.T_SYNTHESIZED_EXIT)
    assert synthesized.height >= 1
    vp_enter_busy = after.filter((pl.col("kind") == Kind.TD_EXIT)
                                 & (pl.col("status") == BUSY_SEPT))
    assert vp_enter_busy.height >= 1
    assert (vp_enter_busy["exit_reason"] == EXIT_REASON_INVALID).all()


def test_local_retry_on_the_same_scenario_and_seed_never_arms() -> None:
    events, truth = run("zero-step", *CONTENDED, "policy.frozen_spte='local_retry'")
    assert truth["zero_step_incidents"] == 0
    assert events.filter(pl.col("kind") == Kind.T_ZERO_STEP_ARMED).height == 0
    retries = events.filter((pl.col("kind") == Kind.FAULT_RETRY)
                            & (pl.col("sub") == RetryCause.FROZEN_SPTE))
    assert retries.height > 0  # the contention is there; it is retried in the host
    assert truth["local_retries"] >= retries.height - truth.get("synthesized_exits", 0) > 0


def test_track_racing_vp_enter_gets_busy_epoch_and_the_retry_after_the_kick_succeeds() -> None:
    events, truth = run("zap-under-load", "run.duration_us=30000")
    track = events.filter((pl.col("kind") == Kind.SEAMCALL)
                          & (pl.col("leaf") == Leaf.TDH_MEM_TRACK))
    busy = track.filter(pl.col("status") == BUSY_EPOCH)
    assert busy.height >= 1
    assert truth["busy_by_leaf_operand"]["TDH.MEM.TRACK|TD_EPOCH"] == busy.height
    for row in busy.iter_rows(named=True):
        later = events.filter((pl.col("corr") == row["corr"]) & (pl.col("seq") > row["seq"]))
        kick = later.filter(pl.col("kind") == Kind.KICK).row(0, named=True)
        assert kick["sub"] == KickReason.NO_VCPUS_RETRY
        retry = later.filter((pl.col("kind") == Kind.SEAMCALL)
                             & (pl.col("leaf") == Leaf.TDH_MEM_TRACK)).row(0, named=True)
        assert retry["seq"] > kick["seq"] and retry["status"] == Status.SUCCESS
    assert truth.get("vms_bugged", 0) == 0


def test_two_vcpus_faulting_on_one_gfn_give_one_aug_and_a_local_retry() -> None:
    events, _ = run("fault-storm", "td.vcpus=2", "guest.workload='hot'", "guest.hot_pages=1",
                    "guest.hot_fraction=1.0", "vmm.zap_interval_us=0", "run.duration_us=300")
    aug = events.filter((pl.col("kind") == Kind.SEAMCALL)
                        & (pl.col("leaf") == Leaf.TDH_MEM_PAGE_AUG))
    assert aug.height == 1 and aug["status"][0] == Status.SUCCESS
    loser = 1 - aug["vcpu"][0]
    retried = events.filter((pl.col("kind") == Kind.FAULT_RETRY) & (pl.col("vcpu") == loser))
    assert retried.height >= 1
    assert (retried["sub"] == RetryCause.FROZEN_SPTE).all()
    done = events.filter((pl.col("kind") == Kind.FAULT_DONE) & (pl.col("vcpu") == loser))
    assert done["sub"].to_list() == [FaultOutcome.ALREADY_MAPPED]


def _running_td() -> tuple[TdxModule, ModuleTd]:
    module = TdxModule()
    td = ModuleTd(td=0, hkid=1, vcpus=[ModuleVcpu()])
    module.tds.append(td)
    td.nonleaf.update({(3, 0), (2, 0), (1, 0)})
    assert module.page_aug(td, 5, 0, 10, (0, 6, 1)) == Status.SUCCESS
    assert module.guest_accept(td, 5, 20, 30, (0, 6, 0)) == Status.SUCCESS
    return module, td


def test_page_remove_without_block_or_before_track_fails_as_documented() -> None:
    module, td = _running_td()
    me = (1, int(Leaf.TDH_MEM_PAGE_REMOVE), 9)
    assert module.page_remove(td, 5, 100, 110, me) == with_operand(
        int(Status.GPA_RANGE_NOT_BLOCKED), OperandId.RCX)
    status, _ = module.vp_enter(td, 0, 0, 0x1000, 120, 130, (0, 0, 2))
    assert status == Status.SUCCESS  # a vCPU runs in the current epoch
    assert module.range_block(td, 5, 200, 210, me) == Status.SUCCESS
    assert module.page_remove(td, 5, 300, 310, me) == with_operand(
        int(Status.TLB_TRACKING_NOT_DONE), OperandId.RCX)
    assert module.track(td, 400, 410, me) == Status.SUCCESS
    # TRACK done but the vCPU that entered in the blocking epoch is still in the guest.
    assert module.page_remove(td, 5, 500, 510, me) == with_operand(
        int(Status.TLB_TRACKING_NOT_DONE), OperandId.RCX)
    assert module.track(td, 600, 610, me) == Status.PREVIOUS_TLB_EPOCH_BUSY
    module.td_exit(td, 0, 0x1000, None)
    assert module.page_remove(td, 5, 700, 710, me) == Status.SUCCESS
    assert td.entries[5].state == SeptState.FREE


def test_track_and_vp_enter_contend_on_the_epoch_lock_both_ways() -> None:
    module, td = _running_td()
    assert module.track(td, 100, 200, (1, 38, 1)) == Status.SUCCESS
    status, _ = module.vp_enter(td, 0, 0, 0x1000, 150, 160, (0, 0, 2))
    assert status == BUSY_EPOCH
    status, _ = module.vp_enter(td, 0, 0, 0x1000, 300, 400, (0, 0, 2))
    assert status == Status.SUCCESS
    assert module.track(td, 350, 360, (1, 38, 3)) == BUSY_EPOCH


@pytest.mark.parametrize("policy", ["retry_loop", "seamcall_spinlock", "kick_retry_once"])
def test_every_zap_busy_policy_runs_and_bugs_only_the_way_kvm_would(policy: str) -> None:
    events, truth = run("zap-under-load", f"policy.zap_busy='{policy}'", "run.duration_us=8000")
    bugged = events.filter(pl.col("kind") == Kind.VM_BUGGED)
    assert bugged.height == truth.get("vms_bugged", 0) <= 1
    if bugged.height:
        # The VM stops: no vCPU enters after KVM_BUG_ON.
        later = events.filter((pl.col("seq") > bugged["seq"][0])
                              & (pl.col("kind") == Kind.TD_ENTRY))
        assert later.height == 0


def test_under_the_2022_spinlock_a_busy_on_the_fault_path_bugs_the_vm() -> None:
    # Seed 002: AUG was checked with KVM_BUG_ON(err); nothing retried a BUSY from VP.ENTER's
    # epoch or a guest ACCEPT: the first one ends the VM.
    fault_leaves = (int(Leaf.TDH_MEM_PAGE_AUG), int(Leaf.TDH_MEM_SEPT_ADD))
    events, truth = run("zero-step", "policy.zap_busy='seamcall_spinlock'", seed=3)
    bugged = events.filter(pl.col("kind") == Kind.VM_BUGGED).row(0, named=True)
    assert truth["vms_bugged"] == 1
    assert bugged["leaf"] in fault_leaves and bugged["status"] >> 32 == Status.OPERAND_BUSY >> 32
    assert events.filter((pl.col("kind") == Kind.FAULT_RETRY)
                         & (pl.col("sub") == RetryCause.SEAMCALL_BUSY)).height == 0


@pytest.mark.parametrize("race", [0.0, 1.0])
def test_vcpus_in_the_guest_when_the_vm_is_bugged_are_kicked_out_and_stay_out(
        race: float) -> None:
    # kvm_vm_dead(): KVM_REQ_VM_DEAD kicks every vCPU out of guest mode; none enters again,
    # not even the vCPU the teardown-race injection reloads (its ioctls get -EIO).
    events, _ = run("zap-under-load", "policy.zap_busy='seamcall_spinlock'",
                    "run.duration_us=8000", f"faults.vcpu_load_during_teardown_p={race}",
                    seed=1)
    bug_seq = events.filter(pl.col("kind") == Kind.VM_BUGGED)["seq"][0]
    after = events.filter(pl.col("seq") > bug_seq)
    kick = after.filter((pl.col("kind") == Kind.KICK) & (pl.col("sub") == KickReason.VM_DEAD))
    exits = after.filter((pl.col("kind") == Kind.TD_EXIT) & (pl.col("exit_reason") == 1))
    assert kick.height == 1 and kick["arg0"][0] == exits.height >= 1
    assert after.filter(pl.col("kind") == Kind.TD_ENTRY).height == 0
    last = events.filter(pl.col("kind").is_in([Kind.TD_ENTRY, Kind.TD_EXIT])).sort("seq") \
        .group_by("vcpu").agg(pl.col("kind").last())
    assert set(last["kind"].to_list()) == {Kind.TD_EXIT}  # nobody is left in the guest
