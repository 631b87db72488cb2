"""busy_retry's chains: retry chains (contention) and resume chains (CACHE.WB's protocol).

See the busy_retry module docstring for what each is. Both are found with plain shifts and
cumulative sums over the calls of the few operations that had a retry status, sorted by
operation and call order: no window and no Python loop per chain.
"""

from __future__ import annotations

import polars as pl

from tdxtrace.codes import status_name

from ._busy_names import flow_name, leaf_name, named, operand_name

CHAIN_KEY = ["corr", "td", "vcpu", "leaf_id", "target"]
CHAIN_SCHEMA: dict[str, pl.DataType] = {
    "corr": pl.Int64(), "td": pl.Int64(), "vcpu": pl.Int64(), "leaf": pl.String(),
    "operand": pl.String(), "flow": pl.String(), "length": pl.Int64(), "outcome": pl.String(),
    "start_ns": pl.Int64(), "lost_ns": pl.Int64(),
}
RESUME_SCHEMA: dict[str, pl.DataType] = {
    "corr": pl.Int64(), "td": pl.Int64(), "vcpu": pl.Int64(), "leaf": pl.String(),
    "target": pl.UInt64(), "flow": pl.String(), "length": pl.Int64(), "busy_calls": pl.Int64(),
    "outcome": pl.String(), "last_status": pl.String(), "start_ns": pl.Int64(),
    "resume_ns": pl.Int64(),
}


def _operations(all_calls: pl.DataFrame) -> pl.DataFrame:
    """The calls of operations with a retry status somewhere, by operation, then call order."""
    # Usually very few. corr alone (one column, nearly unique per operation) narrows the calls
    # cheaply before the join on the whole key.
    retried_ops = all_calls.filter(pl.col("contended") | pl.col("interrupted")).select(
        CHAIN_KEY).unique()
    candidates = all_calls.filter(pl.col("corr").is_in(retried_ops["corr"].implode())
                                  | pl.col("corr").is_null()).join(
        retried_ops, on=CHAIN_KEY, how="semi", nulls_equal=True)
    return candidates.sort([*CHAIN_KEY, "start_seq"], nulls_last=True)


def _members(ordered: pl.DataFrame, cont: pl.Expr) -> pl.DataFrame:
    """The calls of the runs of 2 or more in which ``cont`` says a row continues the previous
    one; ``chain`` numbers the runs. Plain shifts over the sorted calls, no window per run."""
    return ordered.with_columns(cont.fill_null(False).alias("cont")).with_columns(
        (~pl.col("cont")).cum_sum().alias("chain"),
        pl.col("cont").shift(-1, fill_value=False).alias("continued"),
    ).filter(pl.col("cont") | pl.col("continued"))


def _summaries(members: pl.DataFrame, bugs: pl.DataFrame) -> pl.DataFrame:
    """One row per chain of ``members``: its key, length, first and last call."""
    found = members.group_by("chain").agg(
        *(pl.col(k).first() for k in CHAIN_KEY),
        pl.len().cast(pl.Int64).alias("length"), pl.col("start_ns").first(),
        pl.col("start_ns").last().alias("last_ns"), pl.col("end_ns").last().alias("last_end_ns"),
        pl.col("start_seq").first().alias("first_seq"),
        pl.col("status").first().alias("first_status"),
        pl.col("status").last().alias("last_status"), pl.col("flow").first(),
        pl.col("contended").last().alias("last_contended"),
        pl.col("interrupted").last().alias("last_interrupted"),
        pl.col("contended").sum().cast(pl.Int64).alias("busy_calls"),
    ).join(bugs, on=["corr", "leaf_id"], how="left")
    return found.with_columns(
        # error / non-recoverable bit; BUSY and INTERRUPTED_RESUMABLE have it too
        (pl.col("last_status").fill_null(0) // (1 << 62) != 0).alias("failed"),
        (pl.col("bug_seq") > pl.col("first_seq")).fill_null(False).alias("bugged"),
    )


def _outcome(gave_up: pl.Expr) -> pl.Expr:
    return pl.when(gave_up).then(pl.lit("gave_up")).otherwise(pl.lit("success")).alias("outcome")


def chains(all_calls: pl.DataFrame, bugs: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Retry chains (contention), longest first, columns CHAIN_SCHEMA plus first_seq; and
    resume chains, those that gave up first, then longest, RESUME_SCHEMA plus first_seq."""
    ordered = _operations(all_calls)
    return _retry_chains(ordered, bugs), _resume_chains(ordered, bugs)


_SAME_OP = pl.all_horizontal(pl.col(k).eq_missing(pl.col(k).shift(1)) for k in CHAIN_KEY)


def _retry_chains(ordered: pl.DataFrame, bugs: pl.DataFrame) -> pl.DataFrame:
    # A row continues a chain when the previous row is the same operation and returned BUSY
    # or PREVIOUS_TLB_EPOCH_BUSY.
    busy = _summaries(_members(ordered, _SAME_OP & pl.col("contended").shift(1)), bugs)
    busy = busy.with_columns(
        # A chain that ends at a resume got its resource; the resume chain judges the rest.
        _outcome(pl.col("last_contended")
                 | (~pl.col("last_interrupted") & (pl.col("failed") | pl.col("bugged")))),
        (pl.col("last_ns") - pl.col("start_ns")).alias("lost_ns"),
    ).sort(["length", "start_ns", "first_seq"], descending=[True, False, False])
    return busy.select(
        pl.col("corr", "td", "vcpu").cast(pl.Int64), named(busy, "leaf_id", leaf_name, "leaf"),
        named(busy, "first_status", operand_name, "operand"),
        named(busy, "flow", flow_name, "flow"), "length", "outcome", "start_ns", "lost_ns",
        "first_seq",
    ).cast(CHAIN_SCHEMA)  # type: ignore[arg-type]


def _resume_chains(ordered: pl.DataFrame, bugs: pl.DataFrame) -> pl.DataFrame:
    # A *run* is an operation's calls while each previous one returned a retry status; its
    # resume chain is the part from its first INTERRUPTED_RESUMABLE call on. ``before`` (the
    # INTERRUPTED_RESUMABLE calls ahead of the run) is taken at the run's first row and carried
    # down the run: a cumulative sum and a forward fill, no window per run.
    in_run = (_SAME_OP & (pl.col("contended") | pl.col("interrupted")).shift(1)).fill_null(False)
    seen = pl.col("interrupted").cast(pl.Int64).cum_sum()
    ordered = ordered.with_columns(in_run.alias("in_run"), seen.alias("seen")).with_columns(
        pl.when(~pl.col("in_run")).then(pl.col("seen") - pl.col("interrupted").cast(pl.Int64))
        .forward_fill().alias("before"))
    resumed = pl.col("seen") > pl.col("before")  # this row or one before it in the run resumed
    resumes = _summaries(_members(ordered, pl.col("in_run") & resumed.shift(1)), bugs)
    resumes = resumes.with_columns(
        _outcome(pl.col("last_contended") | pl.col("last_interrupted") | pl.col("failed")
                 | pl.col("bugged")),
        (pl.col("last_end_ns") - pl.col("start_ns")).alias("resume_ns"),
    ).sort(["outcome", "length", "start_ns", "first_seq"],
           descending=[False, True, False, False])  # "gave_up" < "success"
    return resumes.select(
        pl.col("corr", "td", "vcpu").cast(pl.Int64), named(resumes, "leaf_id", leaf_name, "leaf"),
        "target", named(resumes, "flow", flow_name, "flow"), "length", "busy_calls",
        "outcome", named(resumes, "last_status", status_name, "last_status"), "start_ns",
        "resume_ns", "first_seq",
    ).cast(RESUME_SCHEMA)  # type: ignore[arg-type]
