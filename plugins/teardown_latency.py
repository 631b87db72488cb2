"""teardown_latency: how long TD teardown takes, where the time goes, and what it leaks.

Per TD, teardown runs from PHASE(TEARDOWN) to the end of RECLAIM_TD (the TDR reclaim and its
WBINVD). The phases in between (private pages, VP.FLUSH, VPFLUSHDONE, CACHE.WB, KEY.FREEID,
control-page reclaim) come from the PHASE/PHASE_DONE rows and the SEAMCALLs inside them. A
linear fit of teardown time against private memory gives seconds per GB, per HKID policy, and
an extrapolation to large TDs. An HKID leak (VPFLUSHDONE left FLUSHVP_NOT_DONE, or KEY.FREEID
failed) means the TD's remaining pages can never be reclaimed.
"""

from __future__ import annotations

from typing import Any, ClassVar

import polars as pl

from tdxtrace import hookimpl
from tdxtrace.analysis import Analyzer, AnalyzerResult
from tdxtrace.codes import Leaf
from tdxtrace.events import Kind, Phase
from tdxtrace.trace import Trace

from ._teardown_fit import extrapolation_table, fit_policies, fit_table
from ._teardown_phases import (
    COLUMNS,
    FLUSHVP_NOT_DONE,
    INTERRUPTED_RESUMABLE,
    PAGE_PHASES,
    is_error,
    phase_instances,
    phases_table,
    status_class,
    teardown_rows,
    vp_flush_table,
)
from ._values import u64

MODEL_NOTE = (
    "seconds_per_gb and the extrapolation fit teardown_ns = fixed + slope * private bytes per "
    "HKID policy (GB = GiB). The model ignores the number of vCPUs: under late HKID release "
    "every private page's TDH.MEM.TRACK kicks every vCPU, so per-page cost grows with vCPU "
    "count, and a TD with more vCPUs than the measured ones will take longer than predicted."
)
UNFINISHED_NOTE = (
    "Teardowns that did not finish (trace ended, or the HKID leaked) report the time observed "
    "so far as a lower bound; max_teardown_ns and the fit use finished teardowns only."
)
LEAK_NOTE = (
    "pages_leaked counts the pages of PRIVATE_PAGES / RECLAIM_* phases (PHASE arg0) that were "
    "not removed or reclaimed: for a TD whose HKID leaked, in every started phase (phases "
    "skipped after the leak announce no page count, so it is a lower bound); for the others, "
    "in finished phases only (pages KVM gave up on after a TDX_BUG_ON), since an unfinished "
    "phase may just be a trace cut short."
)


def _seamcall(leaf: Leaf) -> pl.Expr:
    return (pl.col("kind") == int(Kind.SEAMCALL)) & (pl.col("leaf") == int(leaf))


def _phase_row(kind: Kind, *phases: Phase) -> pl.Expr:
    return (pl.col("kind") == int(kind)) & pl.col("sub").is_in([int(p) for p in phases])


def _known(count: str) -> pl.Expr:
    """A count of distinct vCPUs or LPs seen, null when none was: the calls never ran."""
    return pl.when(pl.col(count) > 0).then(pl.col(count))


def per_td_table(rows: pl.DataFrame, instances: pl.DataFrame) -> pl.DataFrame:
    """One row per TD whose teardown started (PHASE TEARDOWN seen), sorted by td."""
    from_rows = rows.group_by("tdk").agg(
        start_ns=pl.col("ts_ns").filter(_phase_row(Kind.PHASE, Phase.TEARDOWN)).first(),
        teardown_done_ns=pl.col("ts_ns").filter(
            _phase_row(Kind.PHASE_DONE, Phase.TEARDOWN)).last(),
        release_start_ns=pl.col("ts_ns").filter(
            _phase_row(Kind.PHASE, Phase.RELEASE_HKID)).first(),
        last_end_ns=(pl.col("ts_ns") + pl.col("dur_ns")).max(),
        vpflushdone_status=pl.col("status").filter(_seamcall(Leaf.TDH_MNG_VPFLUSHDONE)).last(),
        vpflushdone_calls=_seamcall(Leaf.TDH_MNG_VPFLUSHDONE).sum().cast(pl.Int64),
        # The last VPFLUSHDONE failing is a leak once the release is over; a VPFLUSHDONE
        # phase that ends is not enough, the release may flush every vCPU and try again.
        vpflushdone_ended=_phase_row(Kind.PHASE_DONE, Phase.RELEASE_HKID, Phase.TEARDOWN).any(),
        freeid_status=pl.col("status").filter(_seamcall(Leaf.TDH_MNG_KEY_FREEID)).last(),
        # Only the phases that end the HKID release say it leaked: a VPFLUSHDONE phase may
        # end in FLUSHVP_NOT_DONE and be tried again (the resend_flush loop of seed 001).
        phase_says_leak=(_phase_row(Kind.PHASE_DONE, Phase.RELEASE_HKID, Phase.KEY_FREEID,
                                    Phase.TEARDOWN)
                         & (status_class() == u64(FLUSHVP_NOT_DONE))).any()
        | (_phase_row(Kind.PHASE_DONE, Phase.KEY_FREEID) & is_error()).any(),
        flushed_vcpus=pl.col("vcpu").filter(_seamcall(Leaf.TDH_VP_FLUSH)).drop_nulls()
        .n_unique().cast(pl.Int64),
        wb_lps=pl.col("lp").filter(_seamcall(Leaf.TDH_PHYMEM_CACHE_WB)).drop_nulls()
        .n_unique().cast(pl.Int64),
    )
    sub = pl.col("sub")
    private = sub == int(Phase.PRIVATE_PAGES)
    page_phase = sub.is_in([int(p) for p in PAGE_PHASES]) & pl.col("work").is_not_null()
    unreturned = (pl.col("work").cast(pl.Int64) - pl.col("freed_pages")).clip(lower_bound=0)
    from_phases = instances.group_by("tdk").agg(
        private_work=pl.col("work").filter(private).sum().cast(pl.Int64),
        private_work_known=pl.col("work").filter(private).is_not_null().any(),
        private_counted=(pl.col("removes") + pl.col("reclaims")).filter(private).sum(),
        private_removes=pl.col("removes").filter(private).sum(),
        private_reclaims=pl.col("reclaims").filter(private).sum(),
        private_pages_ns=pl.col("dur_ns").filter(private).sum(),
        private_start_ns=pl.col("start_ns").filter(private).min(),
        private_finished=pl.col("finished").filter(private).all(),
        vcpus_work=pl.col("work").filter(sub == int(Phase.VP_FLUSH)).max().cast(pl.Int64),
        packages_work=pl.col("work").filter(sub == int(Phase.CACHE_WB)).max().cast(pl.Int64),
        reclaim_td_done_ns=pl.col("done_ts").filter(sub == int(Phase.RECLAIM_TD)).max(),
        unreturned_pages=unreturned.filter(page_phase).sum(),
        # A finished page phase that did not give every page back: KVM gave up on those
        # (TDX_BUG_ON) and they stay the TD's. An unfinished one (trace cut short) proves nothing.
        unreturned_finished=unreturned.filter(page_phase & pl.col("finished")).sum(),
    )
    leaked = (
        (is_error("vpflushdone_status").fill_null(False) & pl.col("vpflushdone_ended"))
        | is_error("freeid_status").fill_null(False)
        | pl.col("phase_says_leak")
    )
    private_pages = pl.when(pl.col("private_work_known")).then(pl.col("private_work")).otherwise(
        pl.col("private_counted")).fill_null(0)
    policy = (
        pl.when(pl.col("private_removes") > 0).then(pl.lit("late"))
        .when(pl.col("private_reclaims") > 0).then(pl.lit("early"))
        .when(pl.col("private_start_ns") < pl.col("release_start_ns")).then(pl.lit("late"))
        .when(pl.col("private_start_ns") > pl.col("release_start_ns")).then(pl.lit("early"))
        .otherwise(pl.lit("unknown"))
    )
    end_ns = pl.coalesce("reclaim_td_done_ns", "teardown_done_ns",
                         pl.max_horizontal("last_end_ns", "start_ns"))
    ended = pl.col("reclaim_td_done_ns").is_not_null() | pl.col("teardown_done_ns").is_not_null()
    # An unfinished PRIVATE_PAGES phase (trace ended mid-zap) has only done part of its
    # announced pages: divide its time by the pages it got through instead.
    pages_done = pl.when(pl.col("private_finished")).then(pl.col("private_pages")).otherwise(
        pl.col("private_counted"))
    per_page = pl.when(pages_done > 0).then(pl.col("private_pages_ns") / pages_done)
    return (
        from_rows.filter(pl.col("start_ns").is_not_null())
        .join(from_phases, on="tdk", how="left")
        .with_columns(hkid_leaked=leaked, private_pages=private_pages, end_ns=end_ns)
        .select(
            pl.col("tdk").cast(pl.Int32).alias("td"),
            pl.col("start_ns").cast(pl.Int64),
            pl.col("end_ns").cast(pl.Int64),
            (pl.col("end_ns") - pl.col("start_ns")).cast(pl.Int64).alias("teardown_ns"),
            pl.col("private_pages").cast(pl.Int64),
            pl.col("private_pages_ns").fill_null(0).cast(pl.Int64),
            per_page.cast(pl.Float64).alias("per_page_ns"),
            # Null, not 0, when the phase never started (an HKID leaked before CACHE.WB).
            pl.coalesce("vcpus_work", _known("flushed_vcpus")).cast(pl.Int64).alias("vcpus"),
            pl.coalesce("packages_work", _known("wb_lps")).cast(pl.Int64).alias("packages"),
            policy.alias("policy"),
            pl.col("hkid_leaked"),
            pl.when(pl.col("hkid_leaked")).then(pl.col("unreturned_pages"))
            .otherwise(pl.col("unreturned_finished")).fill_null(0).cast(pl.Int64)
            .alias("pages_leaked"),
            (ended & ~pl.col("hkid_leaked")).alias("finished"),
            pl.col("vpflushdone_calls"),
        )
        .sort("td")
    )


class TeardownLatency(Analyzer):
    name: ClassVar[str] = "teardown_latency"
    template: ClassVar[str | None] = "templates/teardown_latency.html"
    description: ClassVar[str] = (
        "TD teardown time per phase, per-page cost, seconds per GB with extrapolation, HKID leaks")
    columns: ClassVar[tuple[str, ...]] = COLUMNS
    key_metrics: ClassVar[tuple[str, ...]] = ("teardowns", "max_teardown_ns", "hkid_leaks")
    thresholds: ClassVar[dict[str, tuple[float, float]]] = {"hkid_leaks": (1, 1)}

    def analyze(self, trace: Trace) -> AnalyzerResult:
        rows = teardown_rows(trace.observable())
        instances = phase_instances(rows)
        per_td_full = per_td_table(rows, instances)
        per_td = per_td_full.drop("vpflushdone_calls")
        fits = fit_policies(per_td)
        finished = per_td.filter(pl.col("finished"))
        resumes = rows.filter(_seamcall(Leaf.TDH_PHYMEM_CACHE_WB)
                              & (status_class() == u64(INTERRUPTED_RESUMABLE))).height

        def scalar(frame: pl.DataFrame, expr: pl.Expr) -> Any:
            return frame.select(expr).item()

        metrics: dict[str, int | float] = {
            "teardowns": per_td.height,
            "finished": finished.height,
            "hkid_leaks": int(scalar(per_td, pl.col("hkid_leaked").sum())),
            "pages_leaked": int(scalar(per_td, pl.col("pages_leaked").sum())),
            "max_teardown_ns": int(scalar(finished, pl.col("teardown_ns").max()) or 0),
            # Mean over TDs that had private pages; 0 (not NaN) when none had.
            "per_page_ns": float(scalar(per_td, pl.col("per_page_ns").mean()) or 0.0),
            "seconds_per_gb": max((f.seconds_per_gb for f in fits), default=0.0),
            "cache_wb_resumes": resumes,
            # VPFLUSHDONE is called once per TD when it works; every extra call is a retry.
            "vpflushdone_retries": int(scalar(
                per_td_full, (pl.col("vpflushdone_calls") - 1).clip(lower_bound=0).sum())),
        }
        for fit in fits:
            metrics[f"seconds_per_gb_{fit.policy}"] = fit.seconds_per_gb
        notes = [MODEL_NOTE]
        if finished.height < per_td.height:
            notes.append(UNFINISHED_NOTE)
        if metrics["hkid_leaks"] or metrics["pages_leaked"]:
            notes.append(LEAK_NOTE)
        if not per_td.height:
            notes.append("No TD teardown started in this trace.")
        return AnalyzerResult(
            metrics=metrics,
            tables={
                "per_td": per_td,
                "phases": phases_table(instances),
                "vp_flush": vp_flush_table(rows),
                "fit": fit_table(fits),
                "extrapolation": extrapolation_table(fits),
            },
            notes=tuple(notes),
        )


@hookimpl
def register_analyzers() -> list[Analyzer]:
    return [TeardownLatency()]
