"""How long things take: one duration distribution per SEAMCALL leaf and per KVM step.

No citable public source gives SEAMCALL cycle costs (tdx-reference.md §8 marks them
[UNVERIFIED]), so every figure is configurable from the scenario's ``[costs]`` table. The defaults
are chosen so that the published figures come out of the model rather than being pasted in:

* a private 4K fault costs ~8 µs end to end (§8, [DSTACK]): TD exit 0.8 µs + KVM exit handling
  1.5 µs + the mirror walk 0.7 µs + PAGE.AUG 3.0 µs + VP.ENTER 1.2 µs ≈ 7.2 µs, plus the guest's
  ACCEPT;
* teardown figures (per-page zap and per-page RECLAIM) are calibrated in docs/calibration.md.

A duration is ``base * (1 + jitter * u)`` with ``u`` uniform in [-1, 1) from the ``costs`` random
stream, and with probability ``tail_p`` it is multiplied by ``tail_x`` (a slow outlier: an SMI,
a cache miss storm, a preempted host thread).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from tdxtrace.codes import Leaf


@dataclass(frozen=True)
class Cost:
    base_ns: int
    jitter: float = 0.2
    tail_p: float = 0.0
    tail_x: float = 1.0


# Keys are the SEAMCALL names lower-cased without the "tdh." prefix, or a KVM step name.
DEFAULT_LEAF_COSTS: dict[Leaf, Cost] = {
    Leaf.TDH_VP_ENTER: Cost(1200),
    Leaf.TDH_MNG_ADDCX: Cost(3000),
    Leaf.TDH_MEM_PAGE_ADD: Cost(6000),
    Leaf.TDH_MEM_SEPT_ADD: Cost(2500),
    Leaf.TDH_VP_ADDCX: Cost(3000),
    Leaf.TDH_MEM_PAGE_AUG: Cost(3000, 0.25, 0.01, 8.0),
    Leaf.TDH_MEM_RANGE_BLOCK: Cost(1500),  # BLOCK..WBINVD, kick: docs/calibration.md
    Leaf.TDH_MNG_KEY_CONFIG: Cost(5000),
    Leaf.TDH_MNG_CREATE: Cost(10000),
    Leaf.TDH_VP_CREATE: Cost(5000),
    Leaf.TDH_MR_EXTEND: Cost(1000),
    Leaf.TDH_MR_FINALIZE: Cost(50000),
    Leaf.TDH_VP_FLUSH: Cost(5000),
    Leaf.TDH_MNG_VPFLUSHDONE: Cost(2000),
    Leaf.TDH_MNG_KEY_FREEID: Cost(2000),
    Leaf.TDH_MNG_INIT: Cost(100000),
    Leaf.TDH_VP_INIT: Cost(20000),
    Leaf.TDH_PHYMEM_PAGE_RECLAIM: Cost(4750),  # early-release figures, calibration.md
    Leaf.TDH_MEM_PAGE_REMOVE: Cost(3000),
    Leaf.TDH_MEM_TRACK: Cost(1500),
    Leaf.TDH_PHYMEM_CACHE_WB: Cost(200000),
    Leaf.TDH_PHYMEM_PAGE_WBINVD: Cost(3500),
}

DEFAULT_STEP_COSTS: dict[str, Cost] = {
    "td_exit": Cost(800),  # VM exit back into KVM, module side
    "exit_handling": Cost(1500),  # tdx_handle_exit() up to the fault handler
    "mmu_walk": Cost(700),  # kvm_tdp_mmu_map() walk of the mirror root
    "retry_resched": Cost(300),  # one local-retry turn incl. cond_resched()
    "fastpath_loop": Cost(200),  # EXIT_FASTPATH_EXIT_HANDLED back to VP.ENTER
    "kick": Cost(3250),  # kvm_make_all_cpus_request(): IPIs + wait for acknowledgement
    # ... plus this for every vCPU of the TD, running or not: the request walks them all
    # and waits for each; why late teardown grows with vCPUs (docs/calibration.md)
    "kick_per_vcpu": Cost(625),
    "ipi": Cost(2000),  # smp_call_function_single() round trip
    "guest_accept": Cost(1500),  # TDG.MEM.PAGE.ACCEPT in the guest
    "guest_touch": Cost(400),  # guest work between two memory touches
    "userspace_exit": Cost(15000),  # KVM_EXIT_HYPERCALL round trip through the VMM
    "spinlock": Cost(100),  # seamcall_spinlock policy: lock/unlock overhead
    "direct_zap": Cost(60),  # zapping one SPTE of the shared (direct) root, no SEAMCALL
}


def cost_key(leaf: Leaf) -> str:
    """The scenario key of a leaf's cost: ``TDH_MEM_PAGE_AUG`` -> ``mem.page.aug``."""
    return leaf.name.removeprefix("TDH_").lower().replace("_", ".")


LEAF_BY_KEY: dict[str, Leaf] = {cost_key(leaf): leaf for leaf in Leaf}
# The leaves the emulator calls (VP.ENTER as a TD entry, the rest as SEAMCALL rows): the only
# ones a fault can be injected into (faults.spurious_busy_leaf); the others would never draw.
CALLED_LEAVES: tuple[Leaf, ...] = (
    Leaf.TDH_VP_ENTER, Leaf.TDH_MEM_PAGE_AUG, Leaf.TDH_MEM_SEPT_ADD, Leaf.TDH_MEM_RANGE_BLOCK,
    Leaf.TDH_MEM_TRACK, Leaf.TDH_MEM_PAGE_REMOVE, Leaf.TDH_PHYMEM_PAGE_WBINVD,
    Leaf.TDH_PHYMEM_PAGE_RECLAIM, Leaf.TDH_PHYMEM_CACHE_WB, Leaf.TDH_MNG_CREATE,
    Leaf.TDH_MNG_KEY_CONFIG, Leaf.TDH_MNG_ADDCX, Leaf.TDH_MNG_INIT, Leaf.TDH_VP_CREATE,
    Leaf.TDH_VP_ADDCX, Leaf.TDH_VP_INIT, Leaf.TDH_MR_FINALIZE, Leaf.TDH_VP_FLUSH,
    Leaf.TDH_MNG_VPFLUSHDONE, Leaf.TDH_MNG_KEY_FREEID,
)


Sampler = Callable[[], int]  # draws one duration in ns from the ``costs`` stream


class CostModel:
    """Samples durations from per-leaf and per-step distributions with one random stream.

    Hot paths bind a sampler once (:meth:`leaf_sampler`, :meth:`step_sampler`) and call it:
    one Python call per duration instead of three (lookup, method, shared helper).
    """

    def __init__(self, rng: random.Random, leaf_costs: dict[Leaf, Cost],
                 step_costs: dict[str, Cost]) -> None:
        rand = rng.random
        self._leaf = {int(k): _sampler(v, rand) for k, v in leaf_costs.items()}
        self._step = {k: _sampler(v, rand) for k, v in step_costs.items()}
        self._base = {k: v.base_ns for k, v in step_costs.items()}
        self._default = _sampler(Cost(2000), rand)

    def seamcall(self, leaf: int) -> int:
        return self._leaf.get(leaf, self._default)()

    def step(self, name: str) -> int:
        return self._step[name]()

    def leaf_sampler(self, leaf: int) -> Sampler:
        """What :meth:`seamcall` does for ``leaf``, as a function of no arguments."""
        return self._leaf.get(leaf, self._default)

    def step_sampler(self, name: str) -> Sampler:
        """What :meth:`step` does for ``name``, as a function of no arguments."""
        return self._step[name]

    def base(self, name: str) -> int:
        return self._base[name]


def _sampler(cost: Cost, rand: Callable[[], float]) -> Sampler:
    """A closure drawing ``cost``'s durations: its constants are locals, not attributes."""
    # base * (1 + jitter * (2u - 1)) == low + span * u, precomputed per cost.
    low = cost.base_ns * (1.0 - cost.jitter)
    span = 2.0 * cost.base_ns * cost.jitter
    tail_p, tail_x = cost.tail_p, cost.tail_x

    if not tail_p:
        def draw() -> int:
            value = low + span * rand()
            return int(value) if value >= 1.0 else 1
        return draw

    def draw_with_tail() -> int:
        value = low + span * rand()
        if rand() < tail_p:  # a second draw only for costs with a tail, as always
            value *= tail_x
        return int(value) if value >= 1.0 else 1
    return draw_with_tail
