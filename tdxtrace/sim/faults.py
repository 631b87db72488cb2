"""The seeded fault-injection plan: spurious BUSY on a chosen leaf, delayed IPIs.

Each kind of fault draws from its own named random stream, so turning one on does not change
when the others fire.
"""

from __future__ import annotations

from types import SimpleNamespace

from tdxtrace.codes import OperandId, Status, with_operand
from tdxtrace.errors import ScenarioError
from tdxtrace.sim.costs import LEAF_BY_KEY
from tdxtrace.sim.kernel import RandomStreams


class FaultPlan:
    def __init__(self, config: SimpleNamespace, rng: RandomStreams) -> None:
        self._leaf: int | None = None
        if config.spurious_busy_leaf:
            leaf = LEAF_BY_KEY.get(config.spurious_busy_leaf)
            if leaf is None:
                raise ScenarioError(
                    f"faults.spurious_busy_leaf: unknown leaf {config.spurious_busy_leaf!r} "
                    f"(allowed: {', '.join(sorted(LEAF_BY_KEY))})")
            self._leaf = int(leaf)
        self._busy_p = config.spurious_busy_p
        self.injects_busy = self._leaf is not None and self._busy_p > 0
        self._busy_rng = rng.stream("faults.spurious_busy")
        self._ipi_p = config.ipi_delay_p
        self._ipi_ns = config.ipi_delay_ns
        self._ipi_rng = rng.stream("faults.ipi_delay")
        # A spurious BUSY names the S-EPT tree: the most common operand in real traces.
        self._busy_status = with_operand(int(Status.OPERAND_BUSY), OperandId.SEPT_TREE)

    def maybe_spurious_busy(self, leaf: int, now: int) -> int:
        """0, or the BUSY status to return instead of running the call."""
        if leaf == self._leaf and self._busy_p and self._busy_rng.random() < self._busy_p:
            return self._busy_status
        return 0

    def ipi_delay(self, base: int) -> int:
        if self._ipi_p and self._ipi_rng.random() < self._ipi_p:
            return base + int(self._ipi_ns)
        return base
