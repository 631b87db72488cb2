"""The VMM's answer to a MapGPA userspace exit (KVM_EXIT_HYPERCALL, KVM_HC_MAP_GPA_RANGE).

A well-behaved VMM (QEMU) sets the memory attributes of the chunk (KVM_SET_MEMORY_ATTRIBUTES:
a MEM_ATTR row) and KVM zaps what the conversion invalidates: the private leaves for
private -> shared (BLOCK/TRACK/REMOVE through :class:`~tdxtrace.sim.zap.ZapPath`), the shared
leaves for shared -> private (the direct root, no SEAMCALL). It answers only once that zap is
done. The ``mapgpa.vmm`` variants model the VMMs the guest's retry logic was written for:

* ``complete``: every chunk, in one go;
* ``partial``: converts at least ``partial_pages`` pages per TDVMCALL, then answers EAGAIN, so
  KVM returns RETRY with R11 = the next GPA (Hyper-V's partial completion, seed 003). KVM
  advances in whole 2 MiB chunks, so progress is rounded up to chunks;
* ``no_progress``: EAGAIN without converting anything for the first ``no_progress_calls``
  exits of each conversion: RETRY with R11 == R12;
* ``bad_r11``: EAGAIN on the first exit of each TDVMCALL, and the answer carries R11 = R12 +
  R13, outside the range the guest asked for (a misbehaving host);
* ``reject``: EINVAL, which KVM turns into INVALID_OPERAND.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING

from tdxtrace.codes import (
    EAGAIN,
    EINVAL,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
)
from tdxtrace.events import Flow, Kind

if TYPE_CHECKING:
    from tdxtrace.sim.kvm_state import Vcpu
    from tdxtrace.sim.world import World

VMM_VARIANTS = ("complete", "partial", "no_progress", "bad_r11", "reject")


@dataclass
class Conversion:
    """One guest tdx_map_gpa() call: the guest's locals, KVM's progress, the VMM's counters."""

    corr: int
    start: int  # guest: the next GPA to convert (R12 of the next TDVMCALL)
    end: int
    to_private: bool
    retries: int = 0  # guest: consecutive RETRYs without progress
    calls: int = 0  # guest: TDVMCALLs issued
    answer: tuple[int, int] | None = None  # (R10, R11) the guest has not read yet
    next: int = 0  # KVM: map_gpa_next
    host_end: int = 0  # KVM: map_gpa_end
    eagain_left: int = 0  # VMM (no_progress): EAGAINs still to give in this conversion
    converted_in_call: int = 0  # VMM (partial): pages converted in the current TDVMCALL
    exits_in_call: int = 0  # VMM: userspace exits in the current TDVMCALL
    first: int = field(init=False)  # guest: where the conversion began (start moves on)

    def __post_init__(self) -> None:
        self.first = self.start


class MapGpaVmm:
    def __init__(self, world: World, cfg: SimpleNamespace) -> None:
        self.world = world
        self.log = world.log
        self.mode = str(cfg.vmm)
        self.partial_pages = int(cfg.partial_pages)
        self.no_progress_calls = int(cfg.no_progress_calls)

    def begin_conversion(self, conv: Conversion) -> None:
        if self.mode == "no_progress":
            conv.eagain_left = self.no_progress_calls

    def begin_call(self, conv: Conversion) -> None:
        conv.converted_in_call = 0
        conv.exits_in_call = 0

    def bogus_r11(self, conv: Conversion) -> int | None:
        """The out-of-range R11 a misbehaving host answers with, or None (R11 as KVM sets it)."""
        return conv.host_end if self.mode == "bad_r11" else None

    def handle(self, v: Vcpu, conv: Conversion, gpa: int, pages: int, attrs: int,
               answer: Callable[[int], None]) -> None:
        """One KVM_EXIT_HYPERCALL: convert (or not), then ``answer(hypercall.ret)``."""
        if v.stopped or v.td.bugged:
            return
        conv.exits_in_call += 1
        mode = self.mode
        if mode == "reject":
            answer(EINVAL)
            return
        if mode == "no_progress" and conv.eagain_left:
            conv.eagain_left -= 1
            refuse = True
        else:
            refuse = ((mode == "partial" and conv.converted_in_call >= self.partial_pages)
                      or (mode == "bad_r11" and conv.exits_in_call == 1))
        if refuse:
            answer(EAGAIN)
        else:
            conv.converted_in_call += pages
            self._convert(v, conv, gpa, pages, attrs, lambda: answer(0))

    def _convert(self, v: Vcpu, conv: Conversion, gpa: int, pages: int, attrs: int,
                 then: Callable[[], None]) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES, and the zap it makes KVM do before it returns."""
        td = v.td
        to_private = attrs == KVM_MAP_GPA_RANGE_ENCRYPTED
        self.log.emit(Kind.MEM_ATTR, flow=Flow.MAPGPA, corr=conv.corr, td=td.index,
                      vcpu=v.index, lp=v.lp, gpa=gpa, arg0=pages,
                      arg1=KVM_MEMORY_ATTRIBUTE_PRIVATE if to_private else 0)
        if to_private:  # in the vCPU's thread, as QEMU handles the exit
            self.world.attrs.make_private(td, gpa >> 12, pages, then, v.lp)
        else:
            self.world.attrs.make_shared(td, gpa >> 12, pages, then, v.lp)
