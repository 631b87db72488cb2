"""zap_scope: what KVM zaps, why, in which root, what comes back, and what it should not touch.

Rules (observable rows only):

* A **zapped SPTE** is an SPTE_CHANGED row whose old value is present (non-zero, bit 63 clear)
  and whose new value is non-present (bit 63, SHADOW_NONPRESENT_VALUE, set) but not
  FROZEN_SPTE (0x80000000000005A0: that is a fault freezing an entry, not a zap). ``sub`` is
  the root kind (mirror = private, direct = shared), ``arg2`` the root id. It is a **leaf** at
  level 0 (4K) or when the old SPTE has the page-size bit 7 (KVM's ``is_last_spte()``); a
  **private leaf** is a leaf in the mirror root.
* Each zapped SPTE belongs to the latest ZAP row of the same ``corr`` before it (a zap's rows
  share its corr) and takes its reason (conversion, truncation, memslot, notifier, teardown);
  without one it is ``unattributed``. Each ZAP ends at the k-th ZAP_DONE of its corr.
* A producer may batch pages into one row (teardown does) and list SPTE_CHANGED rows for only
  some of them; ZAP_DONE (arg0 = SPTEs, arg1 = private leaves) still has the totals. What it
  reports beyond the rows counts too: as private mirror leaves, and the rest under root kind
  ``unlisted``. Refaults and unexpected private zaps need the rows (a GFN), so batched pages
  are not in them.
* A **refault**: a zapped page (one zap, one TD, one GFN = GPA >> 12 with the shared bit 47
  stripped) whose next event on that GFN is a PAGE_FAULT: the guest touched it again. Several
  zaps before a fault count once (the last). A page is zapped at its first zapping row, or,
  in a zap that invalidates the direct root (a ROOT INVALIDATED row of the zap: its corr,
  before the corr's next ZAP), at that row for the direct root's pages: the vCPUs reload a
  new root and fault before the old root's SPTEs are torn down. An SPTE install is not a
  touch (it finishes a fault, maybe one raised before the zap).
* An **unexpected private zap**: a private leaf zapped by a memslot or mmu_notifier zap while
  the TD runs (not in flow TEARDOWN, not after the TD's teardown began). Private memory
  changes only through conversion or guest_memfd truncation; any other zap makes the guest
  lose a page it accepted, which is a KVM bug (seed 004: "stop hitting everything with the big
  hammer"; §4(b) of the reference lists the legitimate triggers).
* **VM bugged**: every VM_BUGGED row (KVM_BUG_ON), with the SEAMCALL leaf and status behind it.
* A **memory-fault exit**: a USERSPACE_EXIT with reason KVM_EXIT_MEMORY_FAULT, a fault whose
  GFN's attribute disagreed with the access (a private access to a page userspace made
  shared): what a conversion the guest did not ask for costs it.

Tables: ``by_reason_root`` (reason, root_kind, sptes_zapped, leaf_sptes, private_leaves),
``zaps`` (one row per ZAP: corr, td, reason, scope, gpa, pages, sptes_zapped, private_leaves,
batched = SPTEs known only from ZAP_DONE, start_ns, dur_ns = ZAP_DONE ts - ZAP ts),
``refaults`` (per reason with zapped leaves: refaults, median_delay_ns),
``unexpected_private_zaps`` (td, gpa, reason, ts_ns, corr), ``bugged`` (td, ts_ns, leaf,
status, corr, flow). Metrics: ``sptes_zapped``, ``zaps``, ``refaults``,
``private_zaps_unexpected``, ``vms_bugged`` (distinct TDs), ``memory_fault_exits``. Both bug
metrics fail at 1.
"""

from __future__ import annotations

from typing import ClassVar

import polars as pl

from tdxtrace import hookimpl
from tdxtrace.analysis import Analyzer, AnalyzerResult
from tdxtrace.codes import KVM_EXIT_MEMORY_FAULT, LEAF_NAMES, status_name
from tdxtrace.events import Flow, Kind, Phase
from tdxtrace.trace import Trace

from ._zap_scope_sptes import (
    batched_by_reason_root,
    name_of,
    refaults,
    zap_ops,
    zap_totals,
    zapped_sptes,
    zapping_spte,
)

FLOW_NAMES = {int(m): m.name.lower() for m in Flow}
UNEXPECTED_REASONS = ("memslot", "notifier")
READ_KINDS = [int(k) for k in (Kind.ZAP, Kind.ZAP_DONE, Kind.PHASE, Kind.VM_BUGGED,
                                Kind.USERSPACE_EXIT, Kind.ROOT)]
BY_REASON_ROOT = {"reason": pl.String(), "root_kind": pl.String(), "sptes_zapped": pl.Int64(),
                  "leaf_sptes": pl.Int64(), "private_leaves": pl.Int64()}
ZAPS = {"corr": pl.Int64(), "td": pl.Int32(), "reason": pl.String(), "scope": pl.String(),
        "gpa": pl.UInt64(), "pages": pl.Int64(), "sptes_zapped": pl.Int64(),
        "private_leaves": pl.Int64(), "batched": pl.Int64(), "start_ns": pl.Int64(),
        "dur_ns": pl.Int64()}
REFAULTS = {"reason": pl.String(), "refaults": pl.Int64(), "median_delay_ns": pl.Int64()}
UNEXPECTED = {"td": pl.Int32(), "gpa": pl.UInt64(), "reason": pl.String(),
              "ts_ns": pl.Int64(), "corr": pl.Int64()}
BUGGED = {"td": pl.Int32(), "ts_ns": pl.Int64(), "leaf": pl.String(), "status": pl.String(),
          "corr": pl.Int64(), "flow": pl.String()}


def _typed(frame: pl.LazyFrame, schema: dict[str, pl.DataType]) -> pl.LazyFrame:
    return frame.select([pl.col(c).cast(t) for c, t in schema.items()])


class ZapScopeAnalyzer(Analyzer):
    name: ClassVar[str] = "zap_scope"
    template: ClassVar[str | None] = "templates/zap_scope.html"
    description: ClassVar[str] = (
        "SPTEs zapped per reason and root, refaults, private leaves zapped unexpectedly"
    )
    columns: ClassVar[tuple[str, ...]] = (
        "seq", "ts_ns", "kind", "truth", "flow", "sub", "corr", "td", "leaf", "status", "gpa",
        "level", "arg0", "arg1", "exit_reason",
    )
    key_metrics: ClassVar[tuple[str, ...]] = (
        "sptes_zapped", "private_zaps_unexpected", "vms_bugged",
    )
    # A TD that loses an accepted page, or a VM that KVM had to bug, is a KVM bug every time.
    thresholds: ClassVar[dict[str, tuple[float, float]]] = {
        "private_zaps_unexpected": (1, 1), "vms_bugged": (1, 1),
    }

    def analyze(self, trace: Trace) -> AnalyzerResult:
        # One pass keeps the rows the helpers read five times (zaps, the SPTE changes that
        # zap, phases, bugs: few next to the trace), since each lazy read of
        # trace.observable() would decode the file again. The faults that may be refaults
        # (every PAGE_FAULT) are read apart by refaults(), for zapped pages only.
        observable = trace.observable().select(self.columns)
        zap_rows = (
            observable.filter(pl.col("kind").is_in(READ_KINDS) | zapping_spte())
            .collect().lazy()
        )
        # Materialized once (both are small next to the trace): everything below reads them.
        zaps = zap_ops(zap_rows).collect().lazy()
        zapped = zapped_sptes(zap_rows, zaps).collect().lazy()
        totals = zap_totals(zaps, zapped).collect().lazy()
        listed = zapped.group_by("reason", "root_kind").agg(
            pl.len().cast(pl.Int64).alias("sptes_zapped"),
            pl.col("leaf").sum().cast(pl.Int64).alias("leaf_sptes"),
            pl.col("private_leaf").sum().cast(pl.Int64).alias("private_leaves"),
        )
        by_reason_root = _typed(
            pl.concat([listed, batched_by_reason_root(totals)])
            .group_by("reason", "root_kind")
            .agg(pl.all().sum()),
            BY_REASON_ROOT,
        ).sort("reason", "root_kind").collect()
        zap_table = totals.sort("start_ns", "zap_seq").with_columns(
            (pl.col("batched_private") + pl.col("batched_other")).alias("batched")
        )
        refault_rows = refaults(observable, zapped, zap_rows, zaps)
        refault_table = _typed(
            zapped.filter(pl.col("leaf")).select("reason").unique()
            .join(refault_rows.group_by("reason").agg(
                pl.len().alias("refaults"),
                pl.col("delay_ns").median().round().alias("median_delay_ns"),
            ), on="reason", how="left")
            .with_columns(pl.col("refaults").fill_null(0)),
            REFAULTS,
        ).sort("reason").collect()
        unexpected = _unexpected_private_zaps(zap_rows, zapped)
        bugged = _bugged(zap_rows)
        metrics: dict[str, int | float] = {
            "sptes_zapped": int(by_reason_root.get_column("sptes_zapped").sum()),
            "zaps": int(zaps.select(pl.len()).collect().item()),
            "refaults": int(refault_table.get_column("refaults").sum()),
            "private_zaps_unexpected": unexpected.height,
            "vms_bugged": bugged.get_column("td").n_unique() if bugged.height else 0,
            "memory_fault_exits": int(zap_rows.filter(
                (pl.col("kind") == int(Kind.USERSPACE_EXIT))
                & (pl.col("exit_reason") == KVM_EXIT_MEMORY_FAULT)
            ).select(pl.len()).collect().item()),
        }
        tables = {
            "by_reason_root": by_reason_root,
            "zaps": _typed(zap_table, ZAPS).collect(),
            "refaults": refault_table,
            "unexpected_private_zaps": unexpected,
            "bugged": bugged,
        }
        notes = (
            "Refaults are matched per 4K GFN: a fault inside a zapped 2M/1G leaf but on "
            "another GFN is not counted.",
        )
        return AnalyzerResult(metrics=metrics, tables=tables, notes=notes)


def _unexpected_private_zaps(observable: pl.LazyFrame, zapped: pl.LazyFrame) -> pl.DataFrame:
    """Private leaves zapped by memslot/notifier zaps before the TD's teardown began."""
    teardown = (
        observable.filter(
            (pl.col("kind") == int(Kind.PHASE)) & (pl.col("sub") == int(Phase.TEARDOWN))
        )
        .group_by("td")
        .agg(pl.col("ts_ns").min().alias("_teardown_ns"))
    )
    running = pl.col("_teardown_ns").is_null() | (pl.col("ts_ns") < pl.col("_teardown_ns"))
    return _typed(
        zapped.filter(
            pl.col("private_leaf")
            & pl.col("reason").is_in(list(UNEXPECTED_REASONS))
            & (pl.col("flow") != int(Flow.TEARDOWN))
        )
        .join(teardown, on="td", how="left")
        .filter(running)
        .sort("ts_ns", "seq"),
        UNEXPECTED,
    ).collect()


def _bugged(observable: pl.LazyFrame) -> pl.DataFrame:
    rows = (
        observable.filter(pl.col("kind") == int(Kind.VM_BUGGED))
        .sort("seq")
        .select("td", "ts_ns", name_of("leaf", LEAF_NAMES).alias("leaf"), "status", "corr",
                name_of("flow", FLOW_NAMES).alias("flow"))
        .collect()
    )
    # A handful of rows at most (one per bugged TD): naming statuses in Python is fine here.
    names = [None if s is None else status_name(s) for s in rows.get_column("status")]
    return rows.with_columns(pl.Series("status", names, dtype=pl.String)).select(
        [pl.col(c).cast(t) for c, t in BUGGED.items()]
    )


@hookimpl
def register_analyzers() -> list[Analyzer]:
    return [ZapScopeAnalyzer()]
