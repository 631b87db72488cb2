"""KVM's side: TDs and vCPUs, the vCPU run loop, SEAMCALL issue, kicks and KVM_BUG_ON.

The private fault path is in :mod:`.fault`, the zap path in :mod:`.zap`; both call
:meth:`Kvm.seamcall`, the one place that runs a SEAMCALL against the module model, writes its
row and counts BUSY. VP.ENTER follows tdx-reference.md §4(b): a BUSY VP.ENTER is reported by
kvm_exit with exit reason -1u and the fastpath loops back without re-entering at once; while
``wait_for_sept_zap`` is set the loop returns before VP.ENTER (and kvm_entry: no row). An
injected spurious BUSY (:mod:`.faults`) replaces the module's answer in both places, so KVM
handles it exactly as it would a real one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from tdxtrace.codes import (
    EXIT_QUAL_GUEST_WRITE,
    EXIT_QUAL_ZERO_STEP,
    EXIT_REASON_INVALID,
    TDX_EXT_EXIT_QUAL_TYPE_ACCEPT,
    ExitReason,
    Leaf,
    is_busy,
    leaf_name,
)
from tdxtrace.events import Flow, KickReason, Kind
from tdxtrace.sim.kvm_state import KvmTd, Vcpu
from tdxtrace.sim.module import SUCCESS, TdxModule
from tdxtrace.sim.module_state import Busy
from tdxtrace.sim.roots_guest import SHARED_BIT

if TYPE_CHECKING:
    from tdxtrace.sim.world import World

VP_ENTER = int(Leaf.TDH_VP_ENTER)
EPT_VIOLATION = int(ExitReason.EPT_VIOLATION)
EXTERNAL_INTERRUPT = int(ExitReason.EXTERNAL_INTERRUPT)
TDCALL, MSR_WRITE = int(ExitReason.TDCALL), int(ExitReason.MSR_WRITE)
SEAMCALL = int(Kind.SEAMCALL)
# A call a batched teardown row (teardown_pages.py) already ran, handed over with its outcome:
# (status, duration in ns, the lock holder behind a BUSY or None).
Preset = tuple[int, int, Busy | None]


# Enum members as module globals: an Enum attribute lookup costs ~70 ns, paid per event.
_FLOW_RUN = Flow.RUN
_KIND_KICK = Kind.KICK
_KICKREASON_VM_DEAD = KickReason.VM_DEAD
_KIND_TD_ENTRY = Kind.TD_ENTRY
_KIND_TD_EXIT = Kind.TD_EXIT
_KIND_T_LOCK_HOLDER = Kind.T_LOCK_HOLDER
_KIND_T_SYNTHESIZED_EXIT = Kind.T_SYNTHESIZED_EXIT
_KIND_T_ZERO_STEP_ARMED = Kind.T_ZERO_STEP_ARMED
_KIND_T_ZERO_STEP_RESET = Kind.T_ZERO_STEP_RESET
_KIND_T_ZERO_STEP_GPA = Kind.T_ZERO_STEP_GPA
_KIND_VM_BUGGED = Kind.VM_BUGGED


class Kvm:
    """The vCPU run loop and the services the fault and zap paths share."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.sim = world.sim
        self.log = world.log
        self.costs = world.costs
        self.module: TdxModule = world.module
        self.timer_period = world.timer_period_ns
        self.on_private_fault: Callable[[Vcpu, int], None] = lambda v, gpa: None
        self.on_tdvmcall: Callable[[Vcpu], None] = self.enter  # MapGPA installs its handler
        self.before_entry: Callable[[Vcpu], None] | None = None  # roots: kvm_mmu_reload()
        self._spinlock = world.policy.zap_busy == "seamcall_spinlock"
        self._faults = world.faults
        # Samplers bound once: the run loop draws these on every entry and exit.
        self._leaf_ns = {int(leaf): self.costs.leaf_sampler(leaf) for leaf in Leaf}
        self._vp_enter_ns = self.costs.leaf_sampler(VP_ENTER)
        self._fastpath_ns = self.costs.step_sampler("fastpath_loop")
        self._td_exit_ns = self.costs.step_sampler("td_exit")
        self._exit_handling_ns = self.costs.step_sampler("exit_handling")
        self._ipi_ns = self.costs.step_sampler("ipi")  # and these on every zapped page
        self._kick_ns = self.costs.step_sampler("kick")
        self._kick_per_vcpu_ns = self.costs.base("kick_per_vcpu")

    # --- SEAMCALLs ------------------------------------------------------------------------
    def seamcall(self, td: KvmTd, leaf: int, lp: int, corr: int | None, flow: int,
                 call: Callable[[int, int, tuple[int, int, int]], int],
                 then: Callable[[int], None], *, vcpu: int | None = None,
                 gpa: int | None = None, level: int | None = None,
                 arg0: int | None = None, preset: Preset | None = None) -> None:
        """Run one SEAMCALL now (or when the policy spinlock frees), then ``then(status)``.
        ``preset``: the call already ran (a batched teardown row stopped at it): write its row
        and go on with its outcome instead of calling the module again."""
        sim = self.sim
        if self._spinlock and sim.now < td.spin_free_at and preset is None:
            # The 2022 design: a per-TD spinlock around every TDH.MEM.* call (seed 002).
            sim.at(td.spin_free_at, lambda: self.seamcall(
                td, leaf, lp, corr, flow, call, then, vcpu=vcpu, gpa=gpa, level=level,
                arg0=arg0))
            return
        now = sim.now
        if preset is None:
            dur = (self._leaf_ns.get(leaf) or self.costs.leaf_sampler(leaf))()
            if self._spinlock:
                dur += self.costs.step("spinlock")
            self.module.last_busy = None
            # The guard inline: one method call less per SEAMCALL when nothing is injected.
            status = (self.spurious_busy(leaf, now) if self._faults.injects_busy
                      else 0) or call(now, now + dur, (lp, leaf, corr or 0))
        else:
            status, dur, self.module.last_busy = preset
        if self._spinlock:
            td.spin_free_at = now + dur
        # Positional (EventLog.row, in row order): every SEAMCALL row is written here.
        self.log.row(dur, SEAMCALL, flow, 0, corr, td.index, vcpu, lp, leaf, status, None, gpa,
                     level, None, arg0, None, None)
        if status and is_busy(status):  # most calls succeed: skip the call for 0
            self.note_busy(td, leaf, status, corr)
        sim.after(dur, then, status)

    def note_busy(self, td: KvmTd, leaf: int, status: int, corr: int | None) -> None:
        self.log.count_busy(leaf, status)
        holder = self.module.last_busy
        if holder is not None and holder.status == status:
            h_lp, h_leaf, h_corr = holder.holder
            self.log.emit(_KIND_T_LOCK_HOLDER, sub=status & 0xFFFF, corr=corr, td=td.index,
                          leaf=leaf, status=status, arg0=max(h_lp, 0), arg1=max(h_leaf, 0),
                          arg2=max(h_corr, 0))

    def bug_on(self, td: KvmTd, leaf: int | None, status: int | None, corr: int | None,
               flow: int) -> None:
        """KVM_BUG_ON: the VM is bugged, an error is logged, every vCPU stops. ``leaf`` and
        ``status`` are the SEAMCALL's that did it, None for a check of KVM's own state."""
        if td.bugged:
            return
        td.bugged = True
        self.log.count("vms_bugged")
        self.log.emit(_KIND_VM_BUGGED, flow=flow, corr=corr, td=td.index, leaf=leaf,
                      status=status)
        cause = "" if leaf is None else f": {leaf_name(leaf)} returned {status or 0:#x}"
        self.world.note(f"KVM_BUG_ON: TD {td.index}{cause}")
        for v in td.vcpus:
            v.stopped = True
            v.token += 1
        if self._in_guest_mode(td):
            # kvm_vm_dead(): KVM_REQ_VM_DEAD to every vCPU. Those in guest mode are kicked out
            # (an IPI, a TD exit); stopped, they return -EIO instead of entering again. Nobody
            # waits for them, so no kick cost is drawn.
            self._kick_out(td, _KICKREASON_VM_DEAD, corr, flow, None)

    # --- the run loop ---------------------------------------------------------------------
    def start(self, v: Vcpu, when: int) -> None:
        v.next_timer = when + self.timer_period
        self.sim.at(when, self.enter, v)

    def enter(self, v: Vcpu) -> None:
        td = v.td
        if v.stopped or td.dead or self.world.stopping:
            return
        if v.cpu != v.lp or v.migrate_to >= 0:
            self.world.lifecycle.placement.load(v)  # tdx_vcpu_load(); enters again after
            return
        if td.wait_for_sept_zap:
            self.sim.after(self._fastpath_ns(), self.enter, v)
            return
        if self.before_entry is not None:
            self.before_entry(v)
        if v.run_corr is None:
            v.run_corr = self.log.new_corr()
        sim = self.sim
        rip = v.rip()
        # Positional (EventLog.row, in row order): one per entry, a hot path.
        self.log.row(0, _KIND_TD_ENTRY, _FLOW_RUN, 0, v.run_corr, td.index, v.index, v.lp,
                     VP_ENTER, None, None, None, None, rip, None, None, None)
        dur = self._vp_enter_ns()
        v.entering_until = sim.now + dur
        status, synthesized = self.vp_enter(v, rip, dur, v.run_corr)
        if status and is_busy(status):
            self.note_busy(td, VP_ENTER, status, v.run_corr)
            sim.after(dur, self._busy_exit, v, status)
        elif synthesized is not None:
            sim.after(dur, self._exit, v, EPT_VIOLATION, synthesized, False)
        elif status != SUCCESS:
            sim.after(dur, self._busy_exit, v, status)
            v.stopped = True  # unexpected VP.ENTER status: exit to userspace, vCPU stops
            self.log.count("vcpus_stopped_unexpected")
        else:
            v.in_guest = True
            v.token += 1
            sim.after(dur, self.world.guest_step, v, v.token)

    def spurious_busy(self, leaf: int, now: int) -> int:
        """0, or the BUSY (no lock holder) the fault plan answers this call of ``leaf`` with
        instead of the module: every call of the leaf draws here once, in order (:mod:`.faults`)."""
        if not self._faults.injects_busy:
            return 0
        injected = self._faults.maybe_spurious_busy(leaf, now)
        if injected:
            self.module.last_busy = None
        return injected

    def vp_enter(self, v: Vcpu, rip: int, dur: int, corr: int) -> tuple[int, int | None]:
        """TDH.VP.ENTER, or an injected BUSY; a GPA back is a synthesized exit (truth row here)."""
        now = self.sim.now
        injected = self.spurious_busy(VP_ENTER, now)
        if injected:
            return injected, None
        status, synthesized = self.module.vp_enter(v.td.module, v.index, v.lp, rip, now,
                                                   now + dur, (v.lp, VP_ENTER, corr))
        if synthesized is not None:
            self.log.emit(_KIND_T_SYNTHESIZED_EXIT, td=v.td.index, vcpu=v.index,
                          gpa=synthesized, rip=rip)
            self.log.count("synthesized_exits")
        return status, synthesized

    def _busy_exit(self, v: Vcpu, status: int) -> None:
        self.log.emit(_KIND_TD_EXIT, flow=_FLOW_RUN, corr=v.run_corr, td=v.td.index,
                      vcpu=v.index, lp=v.lp, leaf=VP_ENTER, status=status,
                      exit_reason=EXIT_REASON_INVALID, rip=v.rip())
        # tdx_exit_handlers_fastpath(): EXIT_FASTPATH_EXIT_HANDLED, loop back to VP.ENTER.
        self.sim.after(self._fastpath_ns(), self.enter, v)

    def exit_guest(self, v: Vcpu, reason: int, gpa: int | None) -> None:
        """A real TD exit (the guest was running)."""
        v.in_guest = False
        v.token += 1
        self._exit(v, reason, gpa, True)

    def _exit(self, v: Vcpu, reason: int, gpa: int | None, real: bool) -> None:
        td, log = v.td, self.log
        rip = v.rip()
        # Exit qualifications, of EPT violations only (the guest's touches are writes). The
        # extended one only when the guest's ACCEPT caused it (type ACCEPT, 4K level).
        ext_qual = qual = None
        if reason == EPT_VIOLATION:
            ext_qual = TDX_EXT_EXIT_QUAL_TYPE_ACCEPT if v.accepting else None  # info 0: 4K
            qual = EXIT_QUAL_ZERO_STEP if not real else 0 if ext_qual else EXIT_QUAL_GUEST_WRITE
        if real:
            # Zero-step counts private EPT violations the guest's ACCEPT did not cause (§5.1).
            private = reason == EPT_VIOLATION and gpa is not None and not gpa & SHARED_BIT
            private = private and ext_qual is None
            armed, reset, listed = self.module.td_exit(td.module, v.index, rip,
                                                       gpa if private else None)
            if reset:
                log.emit(_KIND_T_ZERO_STEP_RESET, td=td.index, vcpu=v.index, rip=rip)
            if armed:
                log.count("zero_step_incidents")
                log.emit(_KIND_T_ZERO_STEP_ARMED, td=td.index, vcpu=v.index, rip=rip, gpa=gpa,
                         arg0=6)
            if listed:
                log.emit(_KIND_T_ZERO_STEP_GPA, td=td.index, vcpu=v.index, rip=rip, gpa=gpa,
                         arg0=listed)
        # Positional (EventLog.row, in row order): one per exit, a hot path.
        self.log.row(0, _KIND_TD_EXIT, _FLOW_RUN, 0, v.run_corr, td.index, v.index, v.lp, VP_ENTER,
                     SUCCESS | (TDCALL if reason == MSR_WRITE else reason), reason, gpa, None, rip,
                     qual, ext_qual, None)
        v.run_corr = None
        delay = self._td_exit_ns() + self._exit_handling_ns()
        if reason == EPT_VIOLATION and gpa is not None:
            self.sim.after(delay, self.on_private_fault, v, gpa)
        elif reason == TDCALL:
            self.sim.after(delay, self.on_tdvmcall, v)
        else:
            self.sim.after(delay, self.enter, v)

    def kicked(self, v: Vcpu, token: int) -> None:  # an IPI lands: out, if still in
        if v.in_guest and v.token == token:
            self.exit_guest(v, EXTERNAL_INTERRUPT, None)

    # --- kicks ----------------------------------------------------------------------------
    def kick_all(self, td: KvmTd, reason: KickReason, corr: int | None, flow: int,
                 lp: int, then: Callable[[], None]) -> None:
        """kvm_make_all_cpus_request(KVM_REQ_OUTSIDE_GUEST_MODE): IPI and wait for acks."""
        acked = self._kick_out(td, reason, corr, flow, lp)
        wait = self._kick_ns() + self._kick_per_vcpu_ns * len(td.vcpus)
        self.sim.after(max(wait, acked + 1), then)

    def _in_guest_mode(self, td: KvmTd) -> list[Vcpu]:
        """The vCPUs a request must IPI: in the guest, or still inside TDH.VP.ENTER (vcpu->mode
        is IN_GUEST_MODE from before the SEAMCALL until it returns, whatever its status)."""
        now = self.sim.now
        return [v for v in td.vcpus if v.in_guest or v.entering_until > now]

    def _kick_out(self, td: KvmTd, reason: KickReason, corr: int | None, flow: int,
                  lp: int | None) -> int:
        """The KICK row and an IPI to every vCPU in guest mode; the delay until the last ack. A
        vCPU inside TDH.VP.ENTER (interrupts off) exits once its entry is done, and the kick
        waits for it: then no VP.ENTER holds the epoch or tree (tdh_do_no_vcpus() counts on it)."""
        targets = self._in_guest_mode(td)
        self.log.row(0, _KIND_KICK, flow, reason, corr, td.index, None, lp, None, None, None,
                     None, None, None, len(targets), None, None)  # row order: one per zap page
        ipi = self._faults.ipi_delay(self._ipi_ns() // 4)
        now, acked = self.sim.now, ipi
        for v in targets:
            lands = max(ipi, v.entering_until - now)
            acked = max(acked, lands)
            if v.in_guest:  # one still in a failed VP.ENTER returns by itself
                v.token += 1
                self.sim.after(lands, self.kicked, v, v.token)
        return acked
