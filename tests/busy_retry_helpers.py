"""Hand-built SEAMCALL rows for the busy_retry tests."""

from __future__ import annotations

from typing import Any

from tdxtrace.events import Flow, Kind

GPA = 0x1000


def call(ts: int, leaf: int, status: int = 0, *, corr: int | None = 1, gpa: int | None = GPA,
         td: int = 0, vcpu: int | None = 0, lp: int = 0, dur: int = 100,
         flow: Flow = Flow.FAULT, arg0: int | None = None) -> dict[str, Any]:
    """One SEAMCALL row: ``leaf`` called at ``ts`` for ``dur`` ns, returning ``status``."""
    return {"kind": Kind.SEAMCALL, "ts_ns": ts, "dur_ns": dur, "leaf": leaf, "status": status,
            "corr": corr, "gpa": gpa, "td": td, "vcpu": vcpu, "lp": lp, "flow": flow,
            "arg0": arg0}
