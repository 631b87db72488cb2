"""Wiring: one simulated host with its TDs, KVM, the guests and the VMM.

:class:`World` builds every model from a resolved scenario and a seed, runs the guests' side
(touching private memory, accepting AUGed pages, timer interrupts) and the VMM's periodic zaps.
"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

from tdxtrace.codes import PAGE_SIZE, ExitReason, Status, TdcallLeaf
from tdxtrace.events import GUEST_LEAF_BASE, Flow, Kind, SeptState, ZapReason, ZapScope
from tdxtrace.sim.costs import (
    DEFAULT_LEAF_COSTS,
    DEFAULT_STEP_COSTS,
    LEAF_BY_KEY,
    Cost,
    CostModel,
)
from tdxtrace.sim.fault import FaultPath
from tdxtrace.sim.faults import FaultPlan
from tdxtrace.sim.guest import Workload
from tdxtrace.sim.kernel import RandomStreams, Simulator
from tdxtrace.sim.kvm import Kvm
from tdxtrace.sim.kvm_state import KvmTd, Vcpu
from tdxtrace.sim.lifecycle import Lifecycle
from tdxtrace.sim.mapgpa import MapGpa
from tdxtrace.sim.mem_attrs import MemoryAttributes
from tdxtrace.sim.mmu import MirrorRoot
from tdxtrace.sim.module import TdxModule
from tdxtrace.sim.module_state import ModuleTd, ModuleVcpu
from tdxtrace.sim.process import KvmMutex
from tdxtrace.sim.recorder import BatchSink, EventLog
from tdxtrace.sim.roots import Roots
from tdxtrace.sim.roots_guest import SHARED_GFN
from tdxtrace.sim.scenario import Scenario
from tdxtrace.sim.zap import ZapPath

PRIVATE_BASE_GFN = 0x100000  # private memory starts at 4 GiB
EPT_VIOLATION = int(ExitReason.EPT_VIOLATION)
EXTERNAL_INTERRUPT = int(ExitReason.EXTERNAL_INTERRUPT)
MSR_WRITE = int(ExitReason.MSR_WRITE)
ACCEPT_OK = (int(Status.SUCCESS), int(Status.PAGE_ALREADY_ACCEPTED))
GUEST_ACCEPT_HOLDER = GUEST_LEAF_BASE + int(TdcallLeaf.TDG_MEM_PAGE_ACCEPT)
ZAP_SCOPES = {"range_leafs": ZapScope.RANGE_LEAFS, "all_roots": ZapScope.ALL_ROOTS,
              "everything": ZapScope.EVERYTHING}


# Enum members as module globals: a class attribute lookup on an Enum costs ~70 ns,
# which the hot paths below pay many times per event.
_FLOW_ZAP = Flow.ZAP
_KIND_GUEST_ACCEPT = Kind.GUEST_ACCEPT
_KIND_MEM_ATTR = Kind.MEM_ATTR
_SEPTSTATE_FREE = SeptState.FREE
_SEPTSTATE_MAPPED = SeptState.MAPPED
_SEPTSTATE_PENDING = SeptState.PENDING
_ZAPREASON_TRUNCATION = ZapReason.TRUNCATION


def _cost_models(scenario: Scenario, world_rng: RandomStreams) -> CostModel:
    leaf_costs = dict(DEFAULT_LEAF_COSTS)
    step_costs = dict(DEFAULT_STEP_COSTS)
    for name, spec in scenario.data["costs"].items():
        default = leaf_costs.get(LEAF_BY_KEY[name], Cost(2000)) if name in LEAF_BY_KEY \
            else step_costs[name]
        cost = Cost(int(spec.get("base_ns", default.base_ns)), spec.get("jitter", default.jitter),
                    spec.get("tail_p", default.tail_p), spec.get("tail_x", default.tail_x))
        if name in LEAF_BY_KEY:
            leaf_costs[LEAF_BY_KEY[name]] = cost
        else:
            step_costs[name] = cost
    return CostModel(world_rng.stream("costs"), leaf_costs, step_costs)


def lp_layout(lps: int, packages: int, tds: int) -> tuple[list[int], list[int], list[int]]:
    """Which LPs do what: (each package's first LP, the TDs' VMM LPs, the vCPUs' LPs).

    The kernel runs CACHE.WB and KEY.CONFIG on each package's first online CPU. Each TD's
    VMM (a QEMU process of its own) gets an LP of its own, from the last down, skipping those
    first LPs (a function sent there would wait for the VMM's SEAMCALL in progress) while
    others are left; the vCPUs run on the rest. More TDs than spare LPs share VMM LPs in turn.
    """
    packages = max(1, min(packages, lps))
    first = [-(-p * lps // packages) for p in range(packages)]
    top_down = [lp for lp in range(lps - 1, -1, -1) if lp not in first]
    top_down += [lp for lp in range(lps - 1, -1, -1) if lp in first]
    vmm = top_down[:max(1, min(tds, lps - 1))]
    vcpus = [lp for lp in range(lps) if lp not in vmm] or vmm[:1]
    return first, vmm, vcpus


class World:
    def __init__(self, scenario: Scenario, seed: int, sink: BatchSink) -> None:
        self.scenario = scenario
        self.seed = seed
        self.sim = Simulator()
        self.rng = RandomStreams(seed)
        self.log = self.make_log(sink)
        self.costs = _cost_models(scenario, self.rng)
        policy = scenario.policy
        self.policy = SimpleNamespace(**vars(policy),
                                      zap_scope_code=int(ZAP_SCOPES[policy.zap_scope]))
        self.faults = FaultPlan(scenario.faults, self.rng)
        self.module = TdxModule()
        host = scenario.host
        self.lps = host.lps
        self.first_lps, self.vmm_lps, self.vcpu_lps = lp_layout(host.lps, host.packages,
                                                                scenario.td.count)
        self.timer_period_ns = 1_000_000_000 // scenario.guest.timer_hz
        self.stopping = False
        self.notes: list[str] = []
        self.kvm = Kvm(self)
        self.attrs = MemoryAttributes(self)
        self.fault_path = FaultPath(self, self.kvm)
        self.kvm.on_private_fault = self.fault_path.handle
        self.zap = ZapPath(self, self.kvm)
        self.tds = [self._build_td(t) for t in range(scenario.td.count)]
        self._vmm_rng = self.rng.stream("vmm")
        self._touch_ns = self.costs.base("guest_touch")
        self._accept_ns = self.costs.step_sampler("guest_accept")  # bound once: hot path
        self._max_touches = scenario.guest.max_touches
        self._accept_before_touch = scenario.guest.accept == "before_touch"
        # Direct roots, shared memory, memslot/notifier zaps and MapGPA: only when used.
        self.roots = Roots(self) if Roots.wanted(scenario) else None
        self.mapgpa = MapGpa(self) if MapGpa.wanted(scenario) else None
        # Every TD is created (MNG.CREATE .. MR.FINALIZE) before its vCPUs start; the run
        # starts when the last creation is done (lifecycle.py).
        self.lifecycle = Lifecycle(self)
        self.lifecycle.create_all()

    def make_log(self, sink: BatchSink) -> EventLog:
        """The event log (a hook: ``replay --until`` returns one that stops at an event)."""
        return EventLog(sink, self.sim)

    def note(self, text: str) -> None:
        self.notes.append(text)

    @property
    def pages(self) -> int:
        return int(self.scenario.td.memory_mb) * (1024 * 1024 // PAGE_SIZE)

    def _build_td(self, index: int) -> KvmTd:
        cfg, guest = self.scenario.td, self.scenario.guest
        mtd = ModuleTd(td=index, hkid=index + 1,
                       vcpus=[ModuleVcpu() for _ in range(cfg.vcpus)])
        self.module.tds.append(mtd)
        vmm_lp = self.vmm_lps[index % len(self.vmm_lps)]
        td = KvmTd(index, mtd, MirrorRoot(root_id=index * 2 + 1), vmm_lp=vmm_lp, zap_lp=vmm_lp,
                   slots_lock=KvmMutex(self.sim))
        vcpu_lps = self.vcpu_lps
        for i in range(cfg.vcpus):
            workload = Workload(guest.workload, i, cfg.vcpus, PRIVATE_BASE_GFN, self.pages,
                                guest.hot_pages, guest.hot_fraction,
                                self.rng.stream(f"guest.td{index}.vcpu{i}"))
            td.vcpus.append(Vcpu(td, i, vcpu_lps[(index * cfg.vcpus + i) % len(vcpu_lps)],
                                 workload, tick_exits=guest.tick_exit == "tdvmcall"))
        return td

    # --- the guest ------------------------------------------------------------------------
    def guest_step(self, v: Vcpu, token: int) -> None:
        """The guest runs until its next exit: a timer tick, an EPT violation, or a kick."""
        if token != v.token or v.stopped:
            return
        sim, kvm = self.sim, self.kvm
        now = sim.now
        if v.handler_exit_due:  # the timer handler re-arms the TSC deadline: #VE, TDVMCALL
            v.handler_exit_due = False
            v.in_handler = True
            # A TDCALL exit (77 in VP.ENTER's status) that KVM remaps by its leaf: kvm_exit
            # and the trace show MSR_WRITE, and the fastpath handles it (no MapGPA).
            kvm.exit_guest(v, MSR_WRITE, None)
            return
        v.in_handler = False  # back at the interrupted RIP
        if now >= v.next_timer:
            while v.next_timer <= now:
                v.next_timer += self.timer_period_ns
            v.handler_exit_due = v.tick_exits  # taken on the next entry
            kvm.exit_guest(v, EXTERNAL_INTERRUPT, None)
            return
        mapgpa = self.mapgpa
        if mapgpa is not None:
            # A MapGPA is its own TDCALL, made outside the accept loop: not at ACCEPT_RIP.
            accepting, v.accepting = v.accepting, False
            if mapgpa.guest_turn(v):
                return
            v.accepting = accepting
            if mapgpa.avoids(v, v.workload.current.gfn):
                # Pages it made shared are not touched privately: the workload moves past
                # them, as many as the mapped-page batch below allows in one step.
                limit = self._touches_until_tick(v, now)
                v.accepting = False  # the page it was to ACCEPT is shared now
                skipped = 0
                while skipped < limit and mapgpa.avoids(v, v.workload.current.gfn):
                    v.workload.advance()
                    skipped += 1
                sim.after(skipped * self._touch_ns, self.guest_step, v, token)
                return
        entries = v.td.module.entries
        touch = v.workload.current
        entry = entries.get(touch.gfn)
        state = entry.state if entry is not None else _SEPTSTATE_FREE
        spent = 0
        if state == _SEPTSTATE_PENDING:
            v.accepting = self._accept_before_touch  # the ACCEPT runs at ACCEPT_RIP there
            # The #VE handler accepts the AUGed page; on success the access completes and the
            # guest runs on (one scheduling step for both, to keep the emulator fast).
            spent = self._accept_ns()
            status = self.module.guest_accept(v.td.module, touch.gfn, now, now + spent,
                                              (v.lp, GUEST_ACCEPT_HOLDER, 0))
            # Positional (EventLog.row, in row order): one per page the guest accepts.
            self.log.row(spent, _KIND_GUEST_ACCEPT, 0, 0, None, v.td.index, v.index, v.lp, None,
                         status, None, touch.gfn << 12, 0, None, None, None, None)
            if status not in ACCEPT_OK:  # the host holds the entry: try again
                sim.after(spent, self.guest_step, v, token)
                return
            state = _SEPTSTATE_MAPPED
        if state == _SEPTSTATE_MAPPED:
            v.accepting = False  # accepted (by this ACCEPT, or another vCPU's): touch it
            touch_ns = self._touch_ns
            limit = self._touches_until_tick(v, now + spent)
            done = 0
            advance = v.workload.advance
            while state == _SEPTSTATE_MAPPED and done < limit:
                touch = advance()
                spent += touch_ns
                done += 1
                entry = entries.get(touch.gfn)
                state = entry.state if entry is not None else _SEPTSTATE_FREE
            sim.after(spent, self.guest_step, v, token)
        elif touch.gfn >= SHARED_GFN and self.roots is not None and self.roots.guest_touch(
                v, token):
            return
        else:
            # guest.accept = before_touch: the guest ACCEPTs the page first, and the ACCEPT of
            # a page not yet AUGed is what exits (the touch never faults on it).
            v.accepting = self._accept_before_touch and touch.gfn < SHARED_GFN
            kvm.exit_guest(v, EPT_VIOLATION, touch.gfn << 12)

    def _touches_until_tick(self, v: Vcpu, at: int) -> int:
        """How many touches one guest step may make from ``at``: those that fit before the
        vCPU's next timer tick, at least one, at most ``guest.max_touches``."""
        left = (v.next_timer - at) // self._touch_ns
        return self._max_touches if left > self._max_touches else (left if left > 1 else 1)

    # --- the VMM --------------------------------------------------------------------------
    def _vmm_zap(self, td: KvmTd) -> None:
        if self.stopping or td.dead:
            return
        vmm = self.scenario.vmm
        count = min(vmm.zap_pages, self.pages)
        start = PRIVATE_BASE_GFN + self._vmm_rng.randrange(self.pages - count + 1)
        again = partial(self._vmm_next, td, self.sim.now + vmm.zap_interval_us * 1000)
        if vmm.zap_reason == "conversion":  # a conversion the guest did not ask for
            self.log.emit(_KIND_MEM_ATTR, flow=_FLOW_ZAP, td=td.index, lp=td.vmm_lp,
                          gpa=start << 12, arg0=count, arg1=0)
            self.attrs.make_shared(td, start, count, again)
        else:
            self.zap.zap(td, list(range(start, start + count)), _ZAPREASON_TRUNCATION, _FLOW_ZAP,
                         again)

    def _vmm_next(self, td: KvmTd, due: int) -> None:
        """One VMM thread: a change is due ``zap_interval_us`` after the last began, or when
        the last one's syscall returned (its zap done), whichever is later."""
        self.sim.at(max(due, self.sim.now), self._vmm_zap, td)

    # --- running --------------------------------------------------------------------------
    def run(self) -> None:
        scenario = self.scenario
        stagger = self.rng.stream("start")
        t0 = self.sim.now  # the end of TD creation
        for td in self.tds:
            for v in td.vcpus:
                self.kvm.start(v, t0 + stagger.randrange(1000, 5000))
            if scenario.vmm.zap_interval_us:
                self.sim.after(scenario.vmm.zap_interval_us * 1000, self._vmm_zap, td)
        if self.roots is not None:
            self.roots.start()
        if self.mapgpa is not None:
            self.mapgpa.start()
        self.lifecycle.placement.start()
        end = t0 + scenario.run.duration_us * 1000
        max_events = scenario.run.max_events
        stop = self.log.stop_check(max_events) if max_events else None
        self.sim.run(end, stop)
        self.stopping = True
        if scenario.teardown.enabled:
            self.lifecycle.teardown_all()  # vCPUs stop, then every TD is torn down
        self.log.flush()

