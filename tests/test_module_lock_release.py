"""A SEAMCALL that fails on a lock releases the locks it took before it (the module's error
path), so a BUSY call holds nothing for the rest of its duration (tdx-reference §6.1)."""

from __future__ import annotations

from tdxtrace.codes import OperandId, Status, with_operand
from tdxtrace.sim.module import TdxModule
from tdxtrace.sim.module_state import ModuleTd, ModuleVcpu, SeptEntry, TdLifecycle
from tdxtrace.sim.module_teardown import LifecycleLeaves

ME, OTHER = (1, 0, 1), (2, 0, 2)
BUSY = int(Status.OPERAND_BUSY)


def _td() -> tuple[TdxModule, ModuleTd]:
    module = TdxModule()
    td = ModuleTd(td=0, hkid=1, lifecycle=TdLifecycle.RUNNABLE, vcpus=[ModuleVcpu()])
    module.tds.append(td)
    return module, td


def test_a_stepping_vp_enter_busy_on_the_tree_leaves_the_epoch_free() -> None:
    module, td = _td()
    td.vcpus[0].zs_gpas = [0x5000]
    assert td.sept_tree.try_take(0, 100, True, OTHER) is None  # someone holds the tree
    status, _ = module.vp_enter(td, 0, 1, 0x1000, 10, 60, ME)
    assert status == with_operand(BUSY, OperandId.SEPT_TREE)
    # TDH.MEM.TRACK takes the epoch exclusively: the failed entry does not hold it, nor the
    # TDR (an exclusive probe).
    assert module.track(td, 20, 30, OTHER) == Status.SUCCESS
    assert td.tdr.try_take(40, 45, True, OTHER) is None


def test_a_synthesized_zero_step_exit_releases_the_tree_before_it_returns() -> None:
    # §5.1: a listed GPA still unmapped: release the S-EPT lock, emulate an EPT violation.
    module, td = _td()
    td.vcpus[0].zs_gpas = [0x5000]
    status, gpa = module.vp_enter(td, 0, 1, 0x1000, 10, 60, ME)
    assert (status, gpa) == (Status.SUCCESS | 48, 0x5000)
    assert td.sept_tree.try_take(20, 30, True, OTHER) is None  # RANGE.BLOCK, TRACK could go


def test_a_busy_entry_lock_leaves_the_tree_and_the_tdr_free() -> None:
    module, td = _td()
    td.nonleaf.update({(3, 0), (2, 0), (1, 0)})
    td.entries[5] = SeptEntry(lock_until=100, lock_holder=OTHER)
    assert module.page_aug(td, 5, 10, 60, ME) == with_operand(BUSY, OperandId.RCX)
    # RANGE.BLOCK takes the tree exclusively: the failed AUG does not hold it shared.
    td.entries[6] = SeptEntry()
    # (It gets past every lock to the entry's state: nothing to block on a free entry.)
    assert module.range_block(td, 6, 20, 30, OTHER) == with_operand(
        int(Status.EPT_ENTRY_FREE), OperandId.RCX)
    # The block held the TDR until 30; the failed AUG (until 60) holds it no longer.
    assert td.tdr.try_take(35, 40, True, OTHER) is None


def test_a_lifecycle_leaf_busy_on_its_second_lock_releases_the_first() -> None:
    module = TdxModule()
    td = ModuleTd(td=0, hkid=1, vcpus=[])
    module.tds.append(td)
    leaves = LifecycleLeaves(module, 1, 1)
    assert td.tdr.try_take(0, 100, False, OTHER) is None  # the TDR is held shared
    # MNG.CREATE takes the KOT, then the TDR exclusively: BUSY on the TDR ...
    assert leaves.mng_create(td, 10, 60, ME) == with_operand(BUSY, OperandId.TDR)
    # ... and the KOT it took is free again for another TD's creation.
    other = ModuleTd(td=1, hkid=2, vcpus=[])
    module.tds.append(other)
    assert leaves.mng_create(other, 20, 30, OTHER) == Status.SUCCESS
