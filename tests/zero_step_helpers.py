"""Hand-built traces for the zero_step tests: a vCPU's exits, fault handling and SEAMCALLs."""

from __future__ import annotations

from typing import Any

import polars as pl

from tdxtrace.codes import EXIT_REASON_INVALID, ExitReason, Leaf, OperandId, Status
from tdxtrace.events import FaultOutcome, Flow, Kind, RetryCause
from tdxtrace.testing import make_trace, run_analyzer
from tdxtrace_plugins.zero_step import ZeroStep

BUSY_SEPT = int(Status.OPERAND_BUSY) | int(OperandId.SEPT_TREE)
EPT = int(ExitReason.EPT_VIOLATION)
SHARED = 1 << 47
RIP = 0xFFFFFFFF81000007
OTHER_RIP = 0xFFFFFFFF8100000E


class Rows:
    """A tiny trace, one vCPU event after another; every row 100 ns after the previous one."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.ts = 0
        self.corr = 1000

    def add(self, kind: Kind, *, gap: int = 100, **cols: Any) -> int:
        self.ts += gap
        self.rows.append({"kind": kind, "ts_ns": self.ts, "flow": 0, "sub": 0, **cols})
        return self.ts

    def exit(self, vcpu: int, rip: int = RIP, gpa: int | None = 0x5000, reason: int = EPT,
             td: int = 0, ext_qual: int | None = None, qual: int | None = None) -> int:
        """A TD exit; ``qual`` and ``ext_qual``: the exit qualification and the extended one
        (arg0, arg1; null: not recorded)."""
        return self.add(Kind.TD_EXIT, flow=Flow.RUN, td=td, vcpu=vcpu, leaf=0, rip=rip,
                        gpa=gpa if reason == EPT else None, exit_reason=reason, status=reason,
                        arg0=qual, arg1=ext_qual)

    def busy_exit(self, vcpu: int, status: int = BUSY_SEPT, td: int = 0,
                  rip: int | None = RIP) -> int:
        return self.add(Kind.TD_EXIT, flow=Flow.RUN, td=td, vcpu=vcpu, leaf=0, rip=rip,
                        status=status, exit_reason=EXIT_REASON_INVALID)

    def faults(self, vcpu: int, count: int, rip: int = RIP, gpa: int = 0x5000,
               td: int = 0) -> list[int]:
        return [self.exit(vcpu, rip, gpa, td=td) for _ in range(count)]

    def handle(self, vcpu: int, gpa: int, outcome: FaultOutcome,
               retries: tuple[RetryCause, ...] = (), took: int = 1_000, td: int = 0) -> int:
        """One fault-handler invocation: PAGE_FAULT, FAULT_RETRY per cause, FAULT_DONE."""
        self.corr += 1
        common = {"flow": Flow.FAULT, "corr": self.corr, "td": td, "vcpu": vcpu, "gpa": gpa}
        start = self.add(Kind.PAGE_FAULT, rip=RIP, arg0=2, **common)
        for cause in retries:
            self.add(Kind.FAULT_RETRY, gap=1, **{**common, "sub": cause})
        self.add(Kind.FAULT_DONE, gap=start + took - self.ts, arg0=len(retries),
                 **{**common, "sub": outcome})
        return start

    def fault_handled(self, vcpu: int, count: int, gpa: int = 0x5000, **kw: Any) -> None:
        for _ in range(count):
            self.exit(vcpu, RIP, gpa)
            self.handle(vcpu, gpa, **kw)

    def seamcall(self, leaf: Leaf, status: int, vcpu: int | None, td: int = 0) -> int:
        return self.add(Kind.SEAMCALL, td=td, vcpu=vcpu, leaf=leaf, status=status, gpa=0x9000,
                        level=0, dur_ns=500)

    def analyze(self) -> Any:
        return run_analyzer(ZeroStep(), make_trace(self.rows))


def incidents(result: Any) -> pl.DataFrame:
    table: pl.DataFrame = result.tables["incidents"]
    return table
