"""MapGPA: the guest's ``tdx_map_gpa()`` and KVM's ``tdx_map_gpa()`` (tdx-reference.md §4(e)).

Guest (Linux after commit 019b383d1132, "x86/tdx: Retry partially-completed page conversion
hypercalls", seed 003): TDVMCALL<MapGPA> with R12 = start, R13 = end - start; a status other
than RETRY ends the conversion (0: done, else failed); on RETRY, R11 outside [start, end) fails
it at once; R11 == start uses one of ``max_retries`` (3) consecutive no-progress tries; any
progress moves start to R11 and resets the budget.

KVM: validation (INVALID_OPERAND for overflow / zero size, an illegal GPA or a range crossing
the shared bit; ALIGN_ERROR for a misaligned start or size; R11 = R12 on error), then one
KVM_EXIT_HYPERCALL per 2 MiB chunk (``args[0]`` without the shared bit). On userspace's return:
0 advances ``map_gpa_next`` by 2 MiB; finished → SUCCESS; more left with an interrupt pending →
RETRY, R11 = map_gpa_next; otherwise the next chunk. EAGAIN → RETRY, EINVAL → INVALID_OPERAND,
both with R11 = map_gpa_next. The VMM's side is :mod:`.mapgpa_vmm`.

Rows (flow MAPGPA, one corr per conversion): GUEST_MAPGPA(START) and per TDVMCALL: TD_EXIT
(reason TDCALL), TDVMCALL, USERSPACE_EXIT, [MEM_ATTR and the zap it causes, with its own corr],
USERSPACE_RETURN, ..., TDVMCALL_DONE, then, once the guest runs again, its GUEST_MAPGPA step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tdxtrace.codes import (
    EAGAIN,
    KVM_EXIT_HYPERCALL,
    KVM_MAP_GPA_RANGE_DECRYPTED,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    PAGE_SIZE,
    TDX_MAP_GPA_MAX_LEN,
    ExitReason,
    TdvmcallLeaf,
    TdvmcallStatus,
)
from tdxtrace.events import Flow, GuestMapGpa, Kind
from tdxtrace.sim.mapgpa_vmm import Conversion, MapGpaVmm
from tdxtrace.sim.roots_guest import GPA_LIMIT, SHARED_BIT, gfn_range

if TYPE_CHECKING:
    from tdxtrace.sim.kvm_state import Vcpu
    from tdxtrace.sim.scenario import Scenario
    from tdxtrace.sim.world import World

TDCALL = int(ExitReason.TDCALL)
MAP_GPA = int(TdvmcallLeaf.MAP_GPA)
SUCCESS = int(TdvmcallStatus.SUCCESS)
RETRY = int(TdvmcallStatus.RETRY)
INVALID_OPERAND = int(TdvmcallStatus.INVALID_OPERAND)
ALIGN_ERROR = int(TdvmcallStatus.ALIGN_ERROR)
RET_STATUS = {EAGAIN: RETRY}  # hypercall.ret -> R10; any other (EINVAL): INVALID_OPERAND
FLOW = int(Flow.MAPGPA)
U64 = (1 << 64) - 1
ENDINGS = {GuestMapGpa.DONE: "mapgpa_done", GuestMapGpa.FAILED: "mapgpa_failed",
           GuestMapGpa.GIVE_UP: "mapgpa_giveups", GuestMapGpa.BAD_R11: "mapgpa_bad_r11"}


def validate(gpa: int, size: int) -> int | None:
    """KVM's checks of R12/R13: the TDVMCALL status to fail with, or None when acceptable."""
    end = (gpa + size) & U64  # the kernel's u64 arithmetic wraps
    last = (end - 1) & U64
    if (end <= gpa or gpa >= GPA_LIMIT or last >= GPA_LIMIT
            or (gpa & SHARED_BIT) != (last & SHARED_BIT)):
        return INVALID_OPERAND
    if gpa % PAGE_SIZE or size % PAGE_SIZE:
        return ALIGN_ERROR
    return None


PICK_TRIES = 8  # draws for a range that overlaps no page another conversion owns


@dataclass
class VcpuMapGpa:
    request: tuple[int, int, bool] | None = None  # (start, end, to_private) the guest will do
    conv: Conversion | None = None  # the conversion in progress
    back: tuple[int, int] | None = None  # "alternate": a range made shared, to convert back


class MapGpa:
    """Guest and KVM sides of MapGPA; installs the TDCALL exit handler into KVM."""

    @staticmethod
    def wanted(scenario: Scenario) -> bool:
        return bool(scenario.mapgpa.interval_us)

    def __init__(self, world: World) -> None:
        from tdxtrace.sim.world import PRIVATE_BASE_GFN  # world imports this module

        cfg = world.scenario.mapgpa
        self.world, self.sim, self.log, self.kvm = world, world.sim, world.log, world.kvm
        self.interval_ns = int(cfg.interval_us) * 1000
        self.size = int(cfg.size_kb) * 1024
        self.direction = str(cfg.direction)
        self.max_retries = int(cfg.max_retries)
        self.base_gfn = PRIVATE_BASE_GFN
        assert world.roots is not None, "MapGPA needs the TDP MMU roots"
        self.vmm = MapGpaVmm(world, cfg)
        self.interrupt_p = float(world.scenario.faults.mapgpa_interrupt_p)
        self._interrupt_rng = world.rng.stream("faults.mapgpa_interrupt")
        self._range_rng = [world.rng.stream(f"mapgpa.td{td.index}") for td in world.tds]
        self._next_vcpu = [0] * len(world.tds)
        self._state = [[VcpuMapGpa() for _ in td.vcpus] for td in world.tds]
        self._turns = 0  # vCPUs with a request or an unread answer: the guest's cheap check
        # The guest's own view: GFNs it has converted (or is converting) to shared. Linux
        # reaches them through the shared alias only, never privately, until a conversion
        # back to private succeeds; a failed one leaves them shared (leaked, as Linux does).
        self._guest_shared: list[set[int]] = [set() for _ in world.tds]
        world.kvm.on_tdvmcall = self.on_tdvmcall
        for name in ("mapgpa_done", "mapgpa_failed", "mapgpa_bad_r11", "mapgpa_eagain",
                     "mapgpa_userspace_exits", "mapgpa_retries_interrupt"):
            self.log.count(name, 0)  # present (as 0) in every summary of a MapGPA run

    def start(self) -> None:
        for td in self.world.tds:
            self.sim.after(self.interval_ns, self._due, td.index)

    def _due(self, td_index: int) -> None:
        td = self.world.tds[td_index]
        if self.world.stopping or td.dead:
            return
        index = self._next_vcpu[td_index]
        self._next_vcpu[td_index] = (index + 1) % len(td.vcpus)
        st = self._state[td_index][index]
        if st.conv is None and st.request is None:
            picked = self._pick(td_index, st)
            if picked is not None:
                self.request(td.vcpus[index], *picked)
        self.sim.after(self.interval_ns, self._due, td_index)

    def _pick(self, td_index: int, st: VcpuMapGpa) -> tuple[int, int, bool] | None:
        """The next conversion of this vCPU, or None to skip its turn.

        A guest converts pages it owns (set_memory_decrypted() on its own buffer), so a new
        range never overlaps pages the guest has made shared, which another conversion owns:
        up to PICK_TRIES draws, then the turn is skipped.
        """
        if self.direction == "alternate" and st.back is not None:
            (start, end), st.back = st.back, None
            return start, end, True
        span = -(-self.size // PAGE_SIZE)
        slots = max(1, self.world.pages - span + 1)
        shared = self._guest_shared[td_index]
        for _ in range(PICK_TRIES):
            start = (self.base_gfn + self._range_rng[td_index].randrange(slots)) * PAGE_SIZE
            end = start + self.size
            if not shared or shared.isdisjoint(gfn_range(start, end)):
                break
        else:
            return None
        if self.direction == "to_private":
            return start, end, True
        return start | SHARED_BIT, end | SHARED_BIT, False  # cc_mkdec(): the shared alias

    def request(self, v: Vcpu, start: int, end: int, to_private: bool) -> None:
        """The guest will call tdx_map_gpa(start, end) the next time it runs."""
        st = self._state[v.td.index][v.index]
        st.request = (start, end, to_private)
        self._turns += 1
        if not to_private:  # from now on the guest reaches these pages through the shared alias
            self._guest_shared[v.td.index].update(gfn_range(start, end))

    # --- the guest ------------------------------------------------------------------------
    def guest_turn(self, v: Vcpu) -> bool:
        """Called when the guest runs; True when it left the guest for a TDVMCALL."""
        if not self._turns:
            return False
        st = self._state[v.td.index][v.index]
        conv = st.conv
        if conv is not None and conv.answer is not None:
            self._turns -= 1
            return self._react(v, st, conv)
        if conv is None and st.request is not None:
            self._turns -= 1
            (start, end, to_private), st.request = st.request, None
            conv = st.conv = Conversion(self.log.new_corr(), start, end, to_private)
            self.log.count("mapgpa_conversions")
            self._guest_row(v, conv, GuestMapGpa.START, end, int(to_private))
            self.vmm.begin_conversion(conv)
            self._call(v, conv)
            return True
        return False

    def _react(self, v: Vcpu, st: VcpuMapGpa, conv: Conversion) -> bool:
        assert conv.answer is not None
        (r10, r11), conv.answer = conv.answer, None
        if r10 != RETRY:
            return self._end(v, st, GuestMapGpa.DONE if r10 == SUCCESS else GuestMapGpa.FAILED,
                             r11)
        if not conv.start <= r11 < conv.end:  # R11 comes from the untrusted VMM
            return self._end(v, st, GuestMapGpa.BAD_R11, r11)
        if r11 == conv.start:
            conv.retries += 1  # a retry without forward progress
            self._guest_row(v, conv, GuestMapGpa.RETRY_NO_PROGRESS, r11, conv.retries)
            if conv.retries >= self.max_retries:
                return self._end(v, st, GuestMapGpa.GIVE_UP, r11)
        else:
            conv.start, conv.retries = r11, 0
            self._guest_row(v, conv, GuestMapGpa.RETRY_PROGRESS, r11, 0)
        self._call(v, conv)
        return True

    def avoids(self, v: Vcpu, gfn: int) -> bool:
        """True when the guest would not touch ``gfn`` privately: it made the page shared."""
        shared = self._guest_shared[v.td.index]
        return bool(shared) and gfn in shared

    def _end(self, v: Vcpu, st: VcpuMapGpa, step: GuestMapGpa, r11: int) -> bool:
        assert st.conv is not None
        self._guest_row(v, st.conv, step, r11, st.conv.retries)
        if step == GuestMapGpa.DONE and st.conv.to_private:
            self._guest_shared[v.td.index].difference_update(gfn_range(st.conv.first, st.conv.end))
        elif step == GuestMapGpa.DONE and self.direction == "alternate":
            # Only a range made shared goes back (Linux leaks one it failed to make shared).
            st.back = (st.conv.first & ~SHARED_BIT, st.conv.end & ~SHARED_BIT)
        self.log.count(ENDINGS[step])
        st.conv = None
        return False  # the guest carries on with its work

    def _call(self, v: Vcpu, conv: Conversion) -> None:
        conv.calls += 1
        self.kvm.exit_guest(v, TDCALL, None)

    def _guest_row(self, v: Vcpu, conv: Conversion, step: GuestMapGpa, arg0: int,
                   arg1: int) -> None:
        self.log.emit(Kind.GUEST_MAPGPA, sub=step, flow=FLOW, corr=conv.corr, td=v.td.index,
                      vcpu=v.index, lp=v.lp, gpa=conv.start, arg0=arg0, arg1=arg1)

    # --- KVM --------------------------------------------------------------------------------
    def on_tdvmcall(self, v: Vcpu) -> None:
        """tdx_handle_tdvmcall() for TDVMCALL<MapGPA>: validate, then the first chunk."""
        conv = self._state[v.td.index][v.index].conv
        if conv is None or v.stopped or v.td.bugged:
            self.kvm.enter(v)
            return
        r12, r13 = conv.start, conv.end - conv.start
        self._row(v, conv, Kind.TDVMCALL, gpa=r12, arg0=MAP_GPA, arg1=r13)
        failed = validate(r12, r13)
        if failed is not None:
            self._answer(v, conv, failed, r12)
            return
        conv.next, conv.host_end = r12, r12 + r13
        self.vmm.begin_call(conv)
        self._exit_chunk(v, conv)

    def _exit_chunk(self, v: Vcpu, conv: Conversion) -> None:
        """__tdx_map_gpa(): KVM_EXIT_HYPERCALL(KVM_HC_MAP_GPA_RANGE) for up to 2 MiB."""
        size = min(conv.host_end - conv.next, TDX_MAP_GPA_MAX_LEN)
        gpa = conv.next & ~SHARED_BIT
        attrs = (KVM_MAP_GPA_RANGE_DECRYPTED if conv.next & SHARED_BIT
                 else KVM_MAP_GPA_RANGE_ENCRYPTED)
        pages = size // PAGE_SIZE
        self._row(v, conv, Kind.USERSPACE_EXIT, gpa=gpa, arg0=pages, arg1=attrs,
                  exit_reason=KVM_EXIT_HYPERCALL)
        self.log.count("mapgpa_userspace_exits")
        half = self.world.costs.step("userspace_exit") // 2
        back = lambda ret: self.sim.after(half, self._returned, v, conv, ret)  # noqa: E731
        self.sim.after(half, self.vmm.handle, v, conv, gpa, pages, attrs, back)

    def _returned(self, v: Vcpu, conv: Conversion, ret: int) -> None:
        """tdx_complete_vmcall_map_gpa(): userspace re-entered KVM_RUN with hypercall.ret."""
        if v.stopped or v.td.bugged:
            return
        self._row(v, conv, Kind.USERSPACE_RETURN, status=ret)
        if ret:
            if ret == EAGAIN:
                self.log.count("mapgpa_eagain")
            bogus = self.vmm.bogus_r11(conv)
            self._answer(v, conv, RET_STATUS.get(ret, INVALID_OPERAND),
                         conv.next if bogus is None else bogus)
            return
        conv.next += TDX_MAP_GPA_MAX_LEN
        if conv.next >= conv.host_end:  # KVM writes no R11: the guest's sub-function stays
            self._answer(v, conv, SUCCESS, MAP_GPA)
        elif self._interrupt_pending(v):  # let the guest take it, then re-issue
            self.log.count("mapgpa_retries_interrupt")
            self._answer(v, conv, RETRY, conv.next)
        else:
            self._exit_chunk(v, conv)

    def _interrupt_pending(self, v: Vcpu) -> bool:
        """kvm_vcpu_has_events(): the guest's timer is due, or an injected interrupt."""
        return self.sim.now >= v.next_timer or (
            bool(self.interrupt_p) and self._interrupt_rng.random() < self.interrupt_p)

    def _answer(self, v: Vcpu, conv: Conversion, r10: int, r11: int) -> None:
        self._row(v, conv, Kind.TDVMCALL_DONE, status=r10, arg0=r11, arg1=MAP_GPA)
        if r10 == RETRY:
            self.log.count("mapgpa_retries")
        conv.answer = (r10, r11)
        self._turns += 1
        self.kvm.enter(v)

    def _row(self, v: Vcpu, conv: Conversion, kind: Kind, *, gpa: int | None = None,
             status: int | None = None, arg0: int | None = None,
             arg1: int | None = None, exit_reason: int | None = None) -> None:
        self.log.emit(kind, flow=FLOW, corr=conv.corr, td=v.td.index, vcpu=v.index, lp=v.lp,
                      gpa=gpa, status=status, arg0=arg0, arg1=arg1, exit_reason=exit_reason)

