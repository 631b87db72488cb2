"""zero_step: why each incident happened, and which ones KVM caused."""

from __future__ import annotations

import pytest
from zero_step_helpers import OTHER_RIP, RIP, Rows, incidents

from tdxtrace.events import FaultOutcome, Flow, Kind, RetryCause


def test_cause_frozen_spte_retry() -> None:
    rows = Rows()
    rows.fault_handled(0, 6, outcome=FaultOutcome.RESUME_GUEST,
                       retries=(RetryCause.FROZEN_SPTE,))
    assert incidents(rows.analyze()).get_column("cause").to_list() == ["frozen_spte_contention"]


@pytest.mark.parametrize(("retries", "cause"), [
    ((), "frozen_spte_contention"),
    # Each of vCPU 0's faults went stale (a zap ended while it waited): the zap sent it back
    # to the guest, not the other vCPU's frozen SPTE.
    ((RetryCause.STALE,), "stale_after_zap"),
])
def test_resume_guest_while_another_vcpu_is_in_flight(
        retries: tuple[RetryCause, ...], cause: str) -> None:
    rows = Rows()
    rows.exit(1, OTHER_RIP, 0x5000)
    rows.corr += 1
    winner = {"flow": Flow.FAULT, "corr": rows.corr, "td": 0, "vcpu": 1, "gpa": 0x5000}
    rows.add(Kind.PAGE_FAULT, rip=OTHER_RIP, **winner)
    rows.fault_handled(0, 6, outcome=FaultOutcome.RESUME_GUEST, retries=retries)
    rows.add(Kind.FAULT_DONE, **{**winner, "sub": FaultOutcome.MAPPED})
    assert incidents(rows.analyze()).get_column("cause").to_list() == [cause]


def test_cause_frozen_spte_when_the_winner_starts_during_the_fault() -> None:
    rows = Rows()
    rows.fault_handled(0, 5, outcome=FaultOutcome.RESUME_GUEST)
    rows.exit(0, RIP, 0x5000)
    rows.corr += 2
    loser = {"flow": Flow.FAULT, "corr": rows.corr - 1, "td": 0, "vcpu": 0, "gpa": 0x5000}
    winner = {"flow": Flow.FAULT, "corr": rows.corr, "td": 0, "vcpu": 1, "gpa": 0x5000}
    rows.add(Kind.PAGE_FAULT, rip=RIP, **loser)
    rows.add(Kind.PAGE_FAULT, rip=OTHER_RIP, **winner)
    rows.add(Kind.FAULT_DONE, **{**loser, "sub": FaultOutcome.RESUME_GUEST})
    rows.add(Kind.FAULT_DONE, **{**winner, "sub": FaultOutcome.MAPPED})
    assert incidents(rows.analyze()).get_column("cause").to_list() == ["frozen_spte_contention"]


def test_faults_handled_before_a_vcpus_first_exit_belong_to_no_run() -> None:
    rows = Rows()
    rows.fault_handled(0, 6, outcome=FaultOutcome.MAPPED, gpa=0x5000)
    # vCPU 1's trace starts inside a fault handler (e.g. an import started mid-run).
    rows.handle(1, 0x9000, FaultOutcome.PENDING_EVENT, retries=(RetryCause.FROZEN_SPTE,))
    for gpa in range(0x10000, 0x16000, 0x1000):
        rows.exit(1, RIP, gpa)
        rows.handle(1, gpa, FaultOutcome.MAPPED)
    causes = incidents(rows.analyze()).get_column("cause").to_list()
    assert causes == ["slow_fault_handling", "other"]


def test_resume_guest_without_contention_is_other() -> None:
    rows = Rows()
    rows.exit(1, OTHER_RIP, 0x5000)
    rows.handle(1, 0x5000, FaultOutcome.MAPPED)  # done before vCPU 0 faults: no overlap
    rows.fault_handled(0, 6, outcome=FaultOutcome.RESUME_GUEST)
    result = rows.analyze()
    assert incidents(result).get_column("cause").to_list() == ["other"]
    # No contention seen, but KVM handed the faults back to the guest unresolved: its doing.
    assert incidents(result).get_column("kvm_caused").to_list() == [True]
    assert result.metrics["kvm_caused_incidents"] == 1


def test_cause_busy_on_fault_path_and_frozen_wins_over_busy() -> None:
    rows = Rows()
    rows.fault_handled(0, 6, outcome=FaultOutcome.PENDING_EVENT,
                       retries=(RetryCause.SEAMCALL_BUSY,))
    rows.fault_handled(1, 5, outcome=FaultOutcome.PENDING_EVENT,
                       retries=(RetryCause.SEAMCALL_BUSY,))
    rows.fault_handled(1, 1, outcome=FaultOutcome.PENDING_EVENT,
                       retries=(RetryCause.FROZEN_SPTE,))
    result = rows.analyze()
    causes = incidents(result).get_column("cause").to_list()
    assert causes == ["busy_on_fault_path", "frozen_spte_contention"]
    # Both are KVM resuming the guest on a fault it could have retried in the host.
    assert result.metrics["kvm_caused_incidents"] == result.metrics["incidents"] == 2


def test_cause_stale_after_zap_comes_after_busy_and_before_memory_fault_exit() -> None:
    # Zaps keep ending while the faults wait for mmu_lock: each is stale, and resume_guest
    # hands it back to the guest, which faults again at the same RIP.
    rows = Rows()
    rows.fault_handled(0, 6, outcome=FaultOutcome.RESUME_GUEST, retries=(RetryCause.STALE,))
    rows.fault_handled(1, 5, outcome=FaultOutcome.RESUME_GUEST, retries=(RetryCause.STALE,))
    rows.fault_handled(1, 1, outcome=FaultOutcome.PENDING_EVENT,
                       retries=(RetryCause.SEAMCALL_BUSY,))
    rows.fault_handled(2, 5, outcome=FaultOutcome.RESUME_GUEST, retries=(RetryCause.STALE,))
    rows.fault_handled(2, 1, outcome=FaultOutcome.MEMORY_FAULT_EXIT)
    result = rows.analyze()
    causes = incidents(result).get_column("cause").to_list()
    assert causes == ["stale_after_zap", "busy_on_fault_path", "stale_after_zap"]
    assert result.metrics["kvm_caused_incidents"] == 3  # each was resumed unresolved


def test_cause_memory_fault_exit_before_slow_handling() -> None:
    # A VMM that keeps making the page shared: each fault exits to userspace (the VMM converts
    # it back), the guest re-enters on the unresolved fault, and the GFN keeps coming back.
    rows = Rows()
    for _ in range(3):
        rows.fault_handled(0, 1, outcome=FaultOutcome.MEMORY_FAULT_EXIT)
        rows.fault_handled(0, 1, outcome=FaultOutcome.MAPPED)
    result = rows.analyze()
    assert incidents(result).get_column("cause").to_list() == ["memory_fault_exit"]
    # KVM accepts this one (the VMM changed the page): counted, not blamed on KVM.
    assert (result.metrics["incidents"], result.metrics["kvm_caused_incidents"]) == (1, 0)


def test_cause_slow_fault_handling() -> None:
    rows = Rows()
    # vCPU 0: the page is mapped, yet the same RIP faults on it again and again.
    rows.fault_handled(0, 6, outcome=FaultOutcome.MAPPED)
    # vCPU 1: distinct pages, but one fault took 200 µs.
    for gpa in range(0x10000, 0x16000, 0x1000):
        rows.exit(1, RIP, gpa)
        rows.handle(1, gpa, FaultOutcome.MAPPED, took=200_000 if gpa == 0x12000 else 1_000)
    # vCPU 2: six distinct pages, all mapped quickly: one instruction touching many pages.
    for gpa in range(0x20000, 0x26000, 0x1000):
        rows.exit(2, RIP, gpa)
        rows.handle(2, gpa, FaultOutcome.MAPPED)
    result = rows.analyze()
    causes = incidents(result).get_column("cause").to_list()
    assert causes == ["slow_fault_handling", "slow_fault_handling", "other"]
    assert result.metrics["kvm_caused_incidents"] == 0
