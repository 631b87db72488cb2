"""zero_step: the TDX module's zero-step mitigation firing, inferred from what KVM can see.

The module (TDX 1.5 ``td_exit_stepping``, tdx-reference §5.1) keeps a per-vCPU counter of
private EPT-violation exits at an unchanged guest RIP. On each such exit: if the RIP differs
from the RIP of the last TD entry, the counter and GPA list reset; then if the counter is below
6 it is incremented, otherwise the GPA is appended to a list of at most 32. While the list is
non-empty, TDH.VP.ENTER takes the S-EPT tree lock exclusively (BUSY|SEPT_TREE for it or for
concurrent TDH.MEM.* calls) and synthesizes EPT-violation exits for listed GPAs still unmapped.
No host interface reports any of this (§5.2), so this analyzer reconstructs it from observable
rows only.

Rules:

* A **run** is, per vCPU in ``seq`` order, the private EPT-violation TD_EXITs (exit reason 48,
  GPA bit 47 clear, not caused by the guest's ACCEPT: extended exit qualification ``arg1``
  type 1, which the module does not count) between two RIP changes. Any real TD_EXIT at
  another RIP ends the run (forward progress); non-EPT exits at the same RIP neither count
  nor end it; VP.ENTER BUSY pseudo-exits (reason 0xFFFFFFFF) are ignored. Runs of two vCPUs
  never merge, even at the same RIP value.
* An **incident** is a run of at least 6 faults: the module's counter reached its threshold at
  the 6th (``armed_ns``). Five faults are not an incident; from the 7th fault on the module
  lists GPAs. ``start_ns`` is the first fault, ``end_ns`` the progress exit (or the vCPU's last
  exit when the trace ends first), ``faults`` the run length.
* ``listed_gpas`` / ``first_listed_gpa``: the distinct pages of faults 7, 8, ... (first 32).
  ``synthesized_exits``: the module's emulated exits, told by their exit qualification
  (``arg0`` = 0x2, write access alone, where hardware sets the linear-address bits too: the
  module's emulate_ept_violation_td_exit()). Without it (``arg0`` null) an estimate: every
  exit on a listed page after the first one (the real fault that listed it).
* ``vp_enter_busy_sept``: this vCPU's VP.ENTERs that returned BUSY|SEPT_TREE
  (0x8000020000000092) inside the incident window; ``other_vcpu_mem_busy_sept``: TDH.MEM.*
  SEAMCALLs of the same TD on other vCPUs (or on no vCPU: the zap path) that returned
  BUSY|SEPT_TREE inside it. Windows are closed intervals [start_ns, end_ns].
* ``cause``, the first that holds over the fault-handler invocations (PAGE_FAULT .. FAULT_DONE
  of one corr) that the run's exits triggered:
  1. ``frozen_spte_contention``: a FAULT_RETRY(FROZEN_SPTE), or a FAULT_DONE(RESUME_GUEST)
     of a fault that did not go stale while another vCPU's fault on the same TD and GFN was
     in flight (intervals overlap).
  2. ``busy_on_fault_path``: a FAULT_RETRY(SEAMCALL_BUSY) or an OPERAND_BUSY SEAMCALL.
  3. ``stale_after_zap``: a FAULT_RETRY(STALE): a zap (or an attribute change) ended while
     the fault was in flight, so KVM dropped its work (is_page_fault_stale()); under
     resume_guest the guest faults again at the same RIP.
  4. ``memory_fault_exit``: a FAULT_DONE(MEMORY_FAULT_EXIT): the GFN's attribute was shared,
     KVM exited to userspace and re-entered the guest on the unresolved fault (§5.2 names it;
     KVM accepts it: the VMM, not KVM, changed the page under the guest).
  5. ``slow_fault_handling``: a GFN resolved (MAPPED / ALREADY_MAPPED) earlier in the run
     faulted again (it was unmapped again), or one invocation took longer than
     ``slow_fault_ns`` (default 100 µs; ~8 µs typical, ~153 µs under heavy load, §8).
  6. ``other``: e.g. one instruction touching more than 6 pages (a case KVM's comment
     accepts).

Tables: ``incidents`` (one row per incident, columns above); ``runs_hist`` (run length ->
runs, for runs of 2+ faults); ``timeline`` (per vCPU, runs of 2+ faults with state "incident"
or "fault_run", merged into 100 time bins, so at most 200 rows per vCPU); ``by_vcpu``
(incidents, faults in them, and all VP.ENTER BUSY|SEPT_TREE returns of each vCPU that had
either). Metrics: ``incidents``, ``kvm_caused_incidents`` (incidents with ``kvm_caused``:
cause 1 or 2, or a fault of the run that KVM handed back to the guest unresolved,
FAULT_DONE(RESUME_GUEST)), ``vcpus_affected``, ``synthesized_exits`` and
``vp_enter_busy_sept`` (sums over incidents), ``other_vcpu_busy_sept`` (distinct calls, even
when inside two incidents' windows), ``max_run`` (longest run), ``runs`` (runs of 2+ faults),
``accept_faults`` (EPT-violation exits the guest's ACCEPT caused, left out of every run).

Why a KVM-caused incident fails the check: with the ``local_retry`` policy KVM retries
RET_PF_RETRY faults inside the host instead of resuming the guest; Sean Christopherson's
argument for it (LKML, 2024-09-13, "Retry seamcall when TDX_OPERAND_BUSY with operand SEPT"):
the goal is that "KVM _never_ triggers zero-step, unless there is a bug somewhere", so that
when it fires KVM can tell a KVM bug from guest interference. A KVM-caused incident
(``kvm_caused_incidents``) is KVM resuming the guest on a fault it could have retried: a KVM
bug under ``local_retry``, the expected cost of ``resume_guest`` (the threshold can be relaxed
from the CLI). The rest are the cases KVM's own comment in tdx_handle_ept_violation() accepts
(a memory-fault exit, one RIP on many pages) or that it cannot avoid (a page zapped again,
slow handling): counted in ``incidents``, not failed.
"""

from __future__ import annotations

from typing import ClassVar

import polars as pl

from tdxtrace import hookimpl
from tdxtrace.analysis import Analyzer, AnalyzerResult
from tdxtrace.codes import STEPPING_EPF_THRESHOLD, Leaf
from tdxtrace.events import Kind
from tdxtrace.trace import Trace

from ._values import u64
from ._zero_step_cause import (
    DEFAULT_SLOW_FAULT_NS,
    busy_call,
    fault_handling,
    incident_causes,
)
from ._zero_step_runs import (
    BUSY_SEPT,
    VCPU,
    exit_segments,
    listed_gpas,
    longest_run,
    runs,
)
from ._zero_step_tables import by_vcpu, runs_hist, timeline
from ._zero_step_windows import count_points_in_windows, windows_open_at_points

MEM_LEAVES = sorted(int(leaf) for leaf in Leaf if leaf.name.startswith("TDH_MEM_"))

INCIDENT_SCHEMA: dict[str, pl.DataType] = {
    "td": pl.Int32(), "vcpu": pl.Int32(), "rip": pl.UInt64(), "start_ns": pl.Int64(),
    "armed_ns": pl.Int64(), "end_ns": pl.Int64(), "faults": pl.Int64(),
    "listed_gpas": pl.Int64(), "first_listed_gpa": pl.UInt64(),
    "synthesized_exits": pl.Int64(), "vp_enter_busy_sept": pl.Int64(),
    "other_vcpu_mem_busy_sept": pl.Int64(), "cause": pl.String(), "kvm_caused": pl.Boolean(),
}


class ZeroStep(Analyzer):
    name: ClassVar[str] = "zero_step"
    template: ClassVar[str | None] = "templates/zero_step.html"
    description: ClassVar[str] = (
        "Zero-step mitigation incidents: 6+ private EPT violations at one RIP without progress"
    )
    columns: ClassVar[tuple[str, ...]] = (
        "seq", "ts_ns", "kind", "truth", "flow", "sub", "corr", "td", "vcpu", "leaf",
        "status", "exit_reason", "gpa", "rip", "arg0", "arg1",
    )
    key_metrics: ClassVar[tuple[str, ...]] = ("incidents", "kvm_caused_incidents", "max_run")
    # An incident KVM caused is a KVM bug (or the resume_guest policy's known cost); the
    # others are the ones KVM accepts (see the module docstring): shown, not failed.
    thresholds: ClassVar[dict[str, tuple[float, float]]] = {"kvm_caused_incidents": (1, 1)}

    def __init__(self, slow_fault_ns: int = DEFAULT_SLOW_FAULT_NS) -> None:
        self.slow_fault_ns = slow_fault_ns

    def analyze(self, trace: Trace) -> AnalyzerResult:
        observable = trace.observable().select(self.columns)
        # The TD exits and their runs are shared with busy_retry (built once per trace in
        # memory); one pass keeps the BUSY SEAMCALLs (few); the fault-handling rows, as many
        # as the exits, are read only for the TDs with an incident (_incidents).
        exit_frame, segmented_frame = exit_segments(trace)
        exits, segmented = exit_frame.lazy(), segmented_frame.lazy()
        busy_calls = observable.filter(busy_call()).collect().lazy()
        all_runs = runs(exits, segmented).collect()
        mem_busy = _mem_busy_sept(busy_calls).collect().lazy()
        incidents = self._incidents(observable, busy_calls, exits, segmented, all_runs,
                                    mem_busy)
        other_busy = _other_vcpu_busy_total(mem_busy, incidents.lazy())
        vp_busy = exits.filter(pl.col("busy_sept")).group_by(VCPU).agg(
            pl.len().cast(pl.Int64).alias("busy_sept")
        )
        metrics: dict[str, int | float] = {
            "incidents": incidents.height,
            "kvm_caused_incidents": incidents.filter(pl.col("kvm_caused")).height,
            "vcpus_affected": incidents.select(VCPU).unique().height,
            "synthesized_exits": int(incidents.get_column("synthesized_exits").sum()),
            "vp_enter_busy_sept": int(incidents.get_column("vp_enter_busy_sept").sum()),
            "other_vcpu_busy_sept": other_busy,
            "max_run": longest_run(segmented),
            "runs": all_runs.height,
            "accept_faults": int(exit_frame.get_column("accept_fault").sum()),
        }
        tables = {
            "incidents": incidents,
            "runs_hist": runs_hist(all_runs),
            "timeline": timeline(all_runs),
            "by_vcpu": by_vcpu(incidents, vp_busy.collect()),
        }
        notes = (
            "synthesized_exits: the EPT-violation exits whose exit qualification (arg0) is "
            "the module's zero-step exit's, write access alone (0x2; hardware always adds the "
            "linear-address bits); an estimate when a row lacks it (arg0 null): every exit on "
            "an already-listed page after the first.",
            "EPT violations caused by the guest's TDG.MEM.PAGE.ACCEPT do not count for the "
            "module; they are left out when the TD_EXIT row carries the extended exit "
            "qualification (arg1, type ACCEPT) and counted when it does not (arg1 null).",
        )
        return AnalyzerResult(metrics=metrics, tables=tables, notes=notes)

    def _incidents(
        self,
        observable: pl.LazyFrame,
        busy_calls: pl.LazyFrame,
        exits: pl.LazyFrame,
        segmented: pl.LazyFrame,
        all_runs: pl.DataFrame,
        busy: pl.LazyFrame,
    ) -> pl.DataFrame:
        armed = all_runs.lazy().filter(pl.col("faults") >= STEPPING_EPF_THRESHOLD)
        windows = armed.select("vkey", *VCPU, "first_seq", "start_ns", "end_ns")
        vp_busy = count_points_in_windows(
            exits.filter(pl.col("busy_sept")), windows, ["vkey"], "first_seq"
        ).rename({"points": "vp_enter_busy_sept"})
        on_td = count_points_in_windows(busy, windows, ["td"], "first_seq")
        on_vcpu = count_points_in_windows(busy, windows, VCPU, "first_seq")
        other = on_td.join(on_vcpu, on="first_seq", how="left", suffix="_own").select(
            "first_seq",
            (pl.col("points") - pl.col("points_own").fill_null(0)).alias(
                "other_vcpu_mem_busy_sept"
            ),
        )
        # Another read of the trace, for the incidents' TDs only, and only if there are any.
        tds = armed.select(pl.col("td").unique().sort()).collect().to_series()
        handling = (
            pl.concat([observable.filter(fault_handling(tds)), busy_calls])
            if tds.len() else busy_calls
        )
        causes = incident_causes(handling, segmented, armed, self.slow_fault_ns)
        joined = (
            armed.join(listed_gpas(segmented), on="seg", how="left")
            .join(vp_busy, on="first_seq", how="left")
            .join(other, on="first_seq", how="left")
            .join(causes.lazy(), on="seg", how="left")
            .with_columns(
                pl.col("listed_gpas", "synthesized_exits", "vp_enter_busy_sept",
                       "other_vcpu_mem_busy_sept").fill_null(0),
                pl.col("cause").fill_null("other"),
                pl.col("kvm_caused").fill_null(False),
            )
        )
        return (
            joined.select([pl.col(c).cast(t) for c, t in INCIDENT_SCHEMA.items()])
            .sort("td", "vcpu", "start_ns")
            .collect()
        )


def _mem_busy_sept(observable: pl.LazyFrame) -> pl.LazyFrame:
    """TDH.MEM.* SEAMCALLs of a known TD that returned BUSY|SEPT_TREE."""
    return observable.filter(
        (pl.col("kind") == int(Kind.SEAMCALL))
        & pl.col("leaf").is_in(MEM_LEAVES)
        & (pl.col("status") == u64(BUSY_SEPT))
        & pl.col("td").is_not_null()
    ).select("seq", "ts_ns", "td", "vcpu")


def _other_vcpu_busy_total(busy: pl.LazyFrame, incidents: pl.LazyFrame) -> int:
    """Distinct BUSY|SEPT TDH.MEM.* calls inside an incident window of *another* vCPU."""
    windows = incidents.select(
        *VCPU, "start_ns", "end_ns", pl.int_range(pl.len()).alias("_window")
    )
    on_td = windows_open_at_points(busy, windows, ["td"], "_window")
    on_vcpu = windows_open_at_points(busy, windows, VCPU, "_window")
    covered = on_td.join(on_vcpu, on="seq", how="left", suffix="_own").filter(
        pl.col("open") - pl.col("open_own").fill_null(0) > 0
    )
    return int(covered.select(pl.len()).collect().item())


@hookimpl
def register_analyzers() -> list[Analyzer]:
    return [ZeroStep()]
