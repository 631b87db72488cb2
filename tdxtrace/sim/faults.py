"""The seeded fault-injection plan: spurious BUSY on a chosen leaf, delayed IPIs.

Each kind of fault draws from its own named random stream, so turning one on does not change
when the others fire.

A spurious BUSY can hit every call KVM makes of the chosen leaf, one draw per call in the order
the calls are issued, and replaces the module's answer (the module is not called):

* SEAMCALLs issued through :meth:`Kvm.seamcall` (fault, zap, creation, teardown rows);
* TDH.VP.ENTER (:meth:`Kvm.vp_enter`: the run loop and the vCPU racing teardown), which KVM
  then handles as any BUSY VP.ENTER: a TD exit with exit reason -1 and a fastpath re-entry;
* each call a batched teardown row stands for: the batch stops at the call that got it, which
  is written as its own row and answered by KVM as above (:mod:`.teardown_pages`).
"""

from __future__ import annotations

from types import SimpleNamespace

from tdxtrace.codes import Leaf, OperandId, Status, with_operand
from tdxtrace.errors import ScenarioError
from tdxtrace.sim.costs import CALLED_LEAVES, LEAF_BY_KEY, cost_key
from tdxtrace.sim.kernel import RandomStreams
from tdxtrace.sim.scenario_spec import leaf_key

L = Leaf
# The resource each leaf's BUSY names when injected (reference §6.2 and §6.3): the S-EPT tree
# for the TDH.MEM.* leaves that take it, the TD epoch for TRACK and VP.ENTER, the KOT for the
# HKID leaves, the vCPU's TDVPR for VP.*; every other TD-scope leaf takes the TDR.
_CONTENDED: dict[int, OperandId] = {
    **{int(leaf): OperandId.SEPT_TREE for leaf in (
        L.TDH_MEM_SEPT_ADD, L.TDH_MEM_SEPT_REMOVE, L.TDH_MEM_PAGE_AUG, L.TDH_MEM_PAGE_ADD,
        L.TDH_MEM_PAGE_REMOVE, L.TDH_MEM_RANGE_BLOCK, L.TDH_MEM_RANGE_UNBLOCK)},
    int(L.TDH_MEM_TRACK): OperandId.TD_EPOCH,
    int(L.TDH_VP_ENTER): OperandId.TD_EPOCH,
    **{int(leaf): OperandId.KOT for leaf in (
        L.TDH_MNG_CREATE, L.TDH_MNG_VPFLUSHDONE, L.TDH_MNG_KEY_FREEID, L.TDH_PHYMEM_CACHE_WB)},
    **{int(leaf): OperandId.TDVPR for leaf in (
        L.TDH_VP_CREATE, L.TDH_VP_ADDCX, L.TDH_VP_INIT, L.TDH_VP_FLUSH)},
}


class FaultPlan:
    def __init__(self, config: SimpleNamespace, rng: RandomStreams) -> None:
        self._leaf: int | None = None
        if config.spurious_busy_leaf:
            # A resolved scenario holds the cost-table key already (scenario_spec normalizes
            # it); a config built by hand may still spell it TDH.MEM.PAGE.AUG.
            leaf = LEAF_BY_KEY.get(leaf_key(config.spurious_busy_leaf))
            if leaf not in CALLED_LEAVES:
                called = ", ".join(sorted(map(cost_key, CALLED_LEAVES)))
                raise ScenarioError(
                    f"faults.spurious_busy_leaf: {config.spurious_busy_leaf!r} is not a leaf "
                    f"the emulator calls (allowed: {called}, or TDH.* names)")
            self._leaf = int(leaf)
        self._busy_p = config.spurious_busy_p
        self.injects_busy = self._leaf is not None and self._busy_p > 0
        self._busy_rng = rng.stream("faults.spurious_busy")
        self._ipi_p = config.ipi_delay_p
        self._ipi_ns = config.ipi_delay_ns
        self._ipi_rng = rng.stream("faults.ipi_delay")
        # A spurious BUSY names a resource the leaf really contends on (reference §6.2), so
        # busy_retry can look for its holder as it would for a real one.
        operand = _CONTENDED.get(self._leaf, OperandId.TDR) if self._leaf is not None else 0
        self._busy_status = with_operand(int(Status.OPERAND_BUSY), operand)

    def maybe_spurious_busy(self, leaf: int, now: int) -> int:
        """0, or the BUSY status to return instead of running the call."""
        if leaf == self._leaf and self._busy_p and self._busy_rng.random() < self._busy_p:
            return self._busy_status
        return 0

    def ipi_delay(self, base: int) -> int:
        if self._ipi_p and self._ipi_rng.random() < self._ipi_p:
            return base + int(self._ipi_ns)
        return base
