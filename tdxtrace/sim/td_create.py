"""TD creation as KVM drives it (tdx-reference.md §4(c)), flow CREATE; one process per TD.

MNG.CREATE under the global ``tdx_lock``, KEY.CONFIG on the first LP of every package (IPI),
MNG.ADDCX per TDCS page, MNG.INIT, then per vCPU a vcpu_load() on the VMM's LP, VP.CREATE,
VP.ADDCX per TDCX page, VP.INIT (under mmu_lock write; it associates the vCPU with that LP),
then MR.FINALIZE. A failing step ends the creation and marks the VM bugged, except a BUSY
MR.FINALIZE: -EBUSY to the VMM, which exits (the TD never runs). Helper of :mod:`.lifecycle`
(same conventions).

Not modelled: KVM_TDX_INIT_MEM_REGION (TDH.MEM.PAGE.ADD plus 16 TDH.MR.EXTEND per page,
reference §4(a) step 5) between VP.INIT and MR.FINALIZE; the TD starts with no private
memory, and the guest's pages are added by AUG on its faults (or by teardown.prepopulate).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from tdxtrace.codes import Leaf, is_busy
from tdxtrace.events import Flow, IpiPurpose, Phase
from tdxtrace.sim.module import SUCCESS
from tdxtrace.sim.module_teardown import TDCS_PAGES, TDVPS_PAGES

if TYPE_CHECKING:
    from tdxtrace.sim.kvm_state import KvmTd
    from tdxtrace.sim.lifecycle import Lifecycle
    from tdxtrace.sim.process import Process

L = Leaf


def create_td(life: Lifecycle, td: KvmTd) -> Process:
    """KVM_TDX_INIT_VM, KVM_TDX_INIT_VCPU for every vCPU, KVM_TDX_FINALIZE_VM."""
    job = life.new_job(td, Flow.CREATE)
    mtd, lv = td.module, life.leaves
    start = life.phase(job, Phase.CREATE, len(td.vcpus))
    yield life.tdx_lock.acquire
    status = yield life.call(job, L.TDH_MNG_CREATE, partial(lv.mng_create, mtd),
                             arg0=mtd.hkid)
    life.tdx_lock.release()
    leaf = L.TDH_MNG_CREATE
    for package, target in enumerate(life.first_lps):
        if not status:
            leaf = L.TDH_MNG_KEY_CONFIG
            status = yield from life.on_lp(job, IpiPurpose.KEY_CONFIG, target, leaf,
                                           partial(lv.key_config, mtd, package))
    steps: list[tuple[Leaf, Callable[..., int], int | None]] = [
        (L.TDH_MNG_ADDCX, partial(lv.mng_addcx, mtd), None)] * TDCS_PAGES
    steps.append((L.TDH_MNG_INIT, partial(lv.mng_init, mtd), None))
    for i in range(len(td.vcpus)):
        steps.append((L.TDH_VP_CREATE, partial(lv.vp_create, mtd, i), i))
        steps += [(L.TDH_VP_ADDCX, partial(lv.vp_addcx, mtd, i), i)] * (TDVPS_PAGES - 1)
        steps.append((L.TDH_VP_INIT, partial(lv.vp_init, mtd, i, job.lp), i))
    for step, fn, vcpu in steps:
        if status:
            break  # ``leaf`` stays the call that failed, for the VM_BUGGED row
        leaf = step
        if leaf == L.TDH_VP_CREATE and vcpu is not None:
            life.placement.init_load(td.vcpus[vcpu], job.lp, job.corr)
        if leaf == L.TDH_VP_INIT:
            yield life.mmu_write(td)  # VP.INIT takes the TDR exclusively
        status = yield life.call(job, leaf, fn, vcpu=vcpu)
        if leaf == L.TDH_VP_INIT:
            td.mmu.release_write()
    life.done(job, Phase.CREATE, start, status)
    if status:
        return life.bug(job, leaf, status)
    start = life.phase(job, Phase.FINALIZE)
    status = yield life.call(job, L.TDH_MR_FINALIZE, partial(lv.mr_finalize, mtd))
    life.done(job, Phase.FINALIZE, start, status)
    life.log.count("tds_created")
    if is_busy(status):
        # tdx_td_finalize(): OPERAND_BUSY is -EBUSY to userspace, not a KVM_BUG_ON (§4(a)
        # step 7). QEMU's tdx_finalize_vm() reports the error and exits: the TD never runs,
        # and it is torn down with the others when the run ends.
        td.vmm_exited = True
        for v in td.vcpus:
            v.stopped = True
        life.log.count("vmm_exits_on_finalize")
        return status
    return life.bug(job, L.TDH_MR_FINALIZE, status) if status else SUCCESS
