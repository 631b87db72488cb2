"""vCPU placement: ``tdx_vcpu_load()``, VP.FLUSH on the LP a vCPU last ran on, and migration.

tdx-reference.md §4(d). KVM remembers the LP a vCPU was last loaded on (``vcpu->cpu``, -1 before
the first load and after a flush). When the vCPU's thread is scheduled on another LP,
``tdx_vcpu_load()`` sends an IPI to the *old* LP, which runs TDH.VP.FLUSH there (the module
dissociates the vCPU; TDX_VCPU_NOT_ASSOCIATED is ignored), before the first TDH.VP.ENTER on the
new LP associates it again. Skipping that flush (fault ``faults.skip_flush_on_migrate_p``)
leaves the vCPU associated with the old LP, so VP.ENTER on the new one returns
TDX_VCPU_ASSOCIATED: KVM sees an unexpected exit and the vCPU stops.

Migrations arrive per vCPU as a Poisson process of ``migration.rate_hz`` (random stream
``migration``) and move it to an idle LP (:meth:`VcpuPlacement._idle_lps`); one takes effect
at the vCPU's next entry, i.e. when its thread is next scheduled, never while it is in guest
mode. KVM_TDX_INIT_VCPU loads the vCPU on the VMM's LP, where TDH.VP.INIT associates it, so
its first run elsewhere flushes that LP the same way.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from tdxtrace.codes import (
    EXIT_QUAL_ZERO_STEP,
    EXIT_REASON_INVALID,
    ExitReason,
    Leaf,
    Status,
    is_busy,
)
from tdxtrace.events import Flow, IpiPurpose, Kind
from tdxtrace.sim.module import SUCCESS
from tdxtrace.sim.module_teardown import LifecycleLeaves

if TYPE_CHECKING:
    from tdxtrace.sim.kvm_state import Vcpu
    from tdxtrace.sim.world import World

VP_FLUSH = int(Leaf.TDH_VP_FLUSH)
VP_ENTER = int(Leaf.TDH_VP_ENTER)
NOT_ASSOCIATED = int(Status.VCPU_NOT_ASSOCIATED)
EXTERNAL_INTERRUPT = int(ExitReason.EXTERNAL_INTERRUPT)
EPT_VIOLATION = int(ExitReason.EPT_VIOLATION)


class VcpuPlacement:
    def __init__(self, world: World, leaves: LifecycleLeaves) -> None:
        self.world = world
        self.kvm = world.kvm
        self.sim = world.sim
        self.log = world.log
        self.costs = world.costs
        self.leaves = leaves
        self.rate_hz = float(world.scenario.migration.rate_hz)
        self.skip_p = float(world.scenario.faults.skip_flush_on_migrate_p)
        self._rng = world.rng.stream("migration")
        self._skip_rng = world.rng.stream("faults.skip_flush_on_migrate")
        self.vcpu_lps = world.vcpu_lps  # the LPs vCPUs run on (world.lp_layout)
        # Per LP, the IPI functions waiting to run there, the running one first.
        self._ipi_queues: dict[int, deque[Callable[[Callable[[], None]], None]]] = {}

    # --- IPIs -----------------------------------------------------------------------------
    def send_ipi(self, purpose: IpiPurpose, td: int, vcpu: int | None, target: int, source: int,
                 corr: int, flow: int) -> tuple[int, int]:
        """smp_call_function_single() from ``source``: (delivery, return) delays, with a row.

        A call to the local LP runs without an IPI: (0, 0) and no row.
        """
        if target == source:
            return 0, 0
        round_trip = self.costs.step("ipi")
        there = self.world.faults.ipi_delay(round_trip // 2)
        self.log.emit(Kind.IPI, sub=purpose, flow=flow, corr=corr, td=td, vcpu=vcpu, lp=target,
                      arg0=source, dur=there)
        return there, round_trip - round_trip // 2

    def flush_vp_on_cpu(self, v: Vcpu, corr: int, flow: int, source: int,
                        then: Callable[[int], None]) -> None:
        """tdx_flush_vp_on_cpu(): VP.FLUSH on ``v.cpu`` by IPI, then tdx_disassociate_vp()."""
        target = v.cpu
        if target < 0:  # never loaded, or already flushed
            then(SUCCESS)
            return
        td = v.td
        mtd = td.module
        there, back = self.send_ipi(IpiPurpose.VP_FLUSH, td.index, v.index, target, source,
                                    corr, flow)

        def call(now: int, until: int, me: tuple[int, int, int]) -> int:
            return self.leaves.vp_flush(mtd, v.index, target, now, until, me)

        def handler(done: Callable[[], None]) -> None:
            def flushed(status: int) -> None:
                if status not in (SUCCESS, NOT_ASSOCIATED):
                    self.kvm.bug_on(td, VP_FLUSH, status, corr, flow)  # TDX_BUG_ON, caller
                self.log.count("vp_flushes")
                v.cpu = -1
                done()
                self.sim.after(back, then, status)

            self.kvm.seamcall(td, VP_FLUSH, target, corr, flow, call, flushed, vcpu=v.index)

        self.sim.after(there, self.run_on_lp, target, handler)

    def run_on_lp(self, lp: int, handler: Callable[[Callable[[], None]], None]) -> None:
        """A function sent to ``lp`` runs after those queued before it, ``handler(done)``: an
        IPI's runs with interrupts off, so a CPU runs them one at a time (the first runs of
        several vCPUs all flush the VMM's LP at once; one TD's VP.FLUSH waits for another's
        CACHE.WB loop on a package's first LP). smp_call_on_cpu() (KEY.CONFIG) runs in a
        kworker instead, interrupts on; queued here too, as its one SEAMCALL cannot be
        interrupted anyway."""
        queue = self._ipi_queues.setdefault(lp, deque())
        queue.append(handler)
        if len(queue) == 1:
            handler(partial(self._handler_done, lp))

    def _handler_done(self, lp: int) -> None:
        queue = self._ipi_queues[lp]
        queue.popleft()
        if queue:
            queue[0](partial(self._handler_done, lp))

    # --- tdx_vcpu_load() --------------------------------------------------------------------
    def load(self, v: Vcpu) -> None:
        """The vCPU's thread runs on ``v.lp`` (or moves to ``v.migrate_to``): load, then enter."""
        old, first_run = v.cpu, v.never_run
        v.never_run = False
        if v.migrate_to >= 0:
            v.lp, v.migrate_to = v.migrate_to, -1
        new = v.lp
        if old == new:
            self.kvm.enter(v)
            return
        if old < 0:
            self.log.emit(Kind.VCPU_LOAD, flow=Flow.RUN, td=v.td.index, vcpu=v.index, lp=new)
            v.cpu = new
            self.kvm.enter(v)
            return
        corr = self.log.new_corr()
        # The first run flushes the VMM's LP, where KVM_TDX_INIT_VCPU loaded it (whether or not
        # a migration was pending too); any later load elsewhere is a migration.
        self.log.count("first_run_flushes" if first_run else "migrations")
        self.log.emit(Kind.VCPU_LOAD, flow=Flow.MIGRATION, corr=corr, td=v.td.index,
                      vcpu=v.index, lp=new, arg0=old)
        if self.skip_p and self._skip_rng.random() < self.skip_p:
            self.log.count("migration_flushes_skipped")  # the injected bug
            self._loaded(v, new)
            return
        self.flush_vp_on_cpu(v, corr, Flow.MIGRATION, new, lambda _: self._loaded(v, new))

    def _loaded(self, v: Vcpu, lp: int) -> None:
        v.cpu = lp
        self.kvm.enter(v)

    def init_load(self, v: Vcpu, lp: int, corr: int) -> None:
        """KVM_TDX_INIT_VCPU is a vCPU ioctl: vcpu_load() on the VMM's LP before VP.CREATE.

        TDH.VP.INIT then associates the vCPU with that LP (the module's
        associate_vcpu_initial(), beyond tdx-reference.md §4(d), which names VP.ENTER only), so
        KVM must remember it: the first KVM_RUN elsewhere flushes it there (:meth:`load`).
        """
        self.log.emit(Kind.VCPU_LOAD, flow=Flow.CREATE, corr=corr, td=v.td.index, vcpu=v.index,
                      lp=lp)
        v.cpu, v.never_run = lp, True

    # --- migrations -----------------------------------------------------------------------
    def start(self) -> None:
        """Arm every vCPU's migration clock (nothing when ``migration.rate_hz`` is 0)."""
        if not self.rate_hz or len(self.vcpu_lps) < 2:
            return
        for td in self.world.tds:
            for v in td.vcpus:
                self._arm(v)

    def _arm(self, v: Vcpu) -> None:
        delay = int(self._rng.expovariate(self.rate_hz) * 1e9)
        self.sim.after(max(1, delay), self._fire, v)

    def _fire(self, v: Vcpu) -> None:
        if self.world.stopping or v.stopped or v.td.bugged:
            return
        idle = self._idle_lps(v)
        if idle:
            v.migrate_to = idle[self._rng.randrange(len(idle))]
        else:
            self.log.count("migrations_no_idle_lp")
        self._arm(v)

    def _idle_lps(self, v: Vcpu) -> list[int]:
        """The LPs ``v`` may move to, in LP order: none that another vCPU's thread runs on or
        is bound for, nor one another vCPU is still associated with (its flush pending).

        The model has no host scheduler, so a thread owns its LP: a move onto a busy LP would
        let two vCPUs run on one LP at once, and the flush IPI to the old LP would land where
        another vCPU is in guest mode without interrupting it. With as many vCPUs as vCPU LPs
        no LP is idle and no vCPU moves.
        """
        taken = {v.migrate_to if v.migrate_to >= 0 else v.lp}
        for td in self.world.tds:
            for u in td.vcpus:
                if u is not v:
                    taken.update((u.lp, u.migrate_to, u.cpu))
        return [lp for lp in self.vcpu_lps if lp not in taken]

    # --- the teardown race (seed 001) -----------------------------------------------------
    def reload_and_enter(self, v: Vcpu, then: Callable[[None], None]) -> None:
        """A vCPU ioctl racing teardown: vcpu_load on its LP, one VP.ENTER, an immediate exit.

        Loading alone would not associate the vCPU (seed 001: only VP.ENTER does); entering
        does, so the module counts it in num_assoc_vcpus again after the VP.FLUSH round.
        """
        td, lp = v.td, v.lp
        self.log.emit(Kind.VCPU_LOAD, flow=Flow.RUN, td=td.index, vcpu=v.index, lp=lp)
        v.cpu, v.never_run = lp, False
        # A BUSY VP.ENTER loops back through the fastpath as in the run loop (kvm.py), until
        # the vCPU's next timer tick, when the model lets a vCPU thread leave KVM (as
        # Lifecycle.teardown_all assumes): an injected BUSY of probability 1 cannot stall it.
        self._race_enter(v, self.log.new_corr(), self.sim.now + self.kvm.timer_period, then)

    def _race_enter(self, v: Vcpu, corr: int, leave_at: int,
                    then: Callable[[None], None]) -> None:
        td, lp = v.td, v.lp
        rip = v.rip()
        self.log.emit(Kind.TD_ENTRY, flow=Flow.RUN, corr=corr, td=td.index, vcpu=v.index, lp=lp,
                      leaf=VP_ENTER, rip=rip)
        dur = self.costs.seamcall(VP_ENTER)
        status, synthesized = self.kvm.vp_enter(v, rip, dur, corr)
        busy = is_busy(status)
        if busy:
            self.kvm.note_busy(td, VP_ENTER, status, corr)

        def exited() -> None:
            qual = None
            if synthesized is not None:
                reason, rax, qual = EPT_VIOLATION, SUCCESS | EPT_VIOLATION, EXIT_QUAL_ZERO_STEP
            elif status == SUCCESS:
                self.kvm.module.td_exit(td.module, v.index, rip, None)
                reason, rax = EXTERNAL_INTERRUPT, SUCCESS | EXTERNAL_INTERRUPT
            else:
                reason, rax = EXIT_REASON_INVALID, status
            self.log.emit(Kind.TD_EXIT, flow=Flow.RUN, corr=corr, td=td.index, vcpu=v.index,
                          lp=lp, leaf=VP_ENTER, status=rax, exit_reason=reason, rip=rip,
                          gpa=synthesized, arg0=qual)
            if busy and self.sim.now < leave_at:  # tdx_exit_handlers_fastpath(): enter again
                self.sim.after(self.costs.step("fastpath_loop"), self._race_enter, v, corr,
                               leave_at, then)
                return
            then(None)

        self.sim.after(dur, exited)
