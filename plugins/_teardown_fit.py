"""Seconds per GB: a linear model of teardown time against private memory, per HKID policy.

Helper of :mod:`tdxtrace_plugins.teardown_latency`. The model is
``teardown_ns = fixed_ns + ns_per_byte * private_bytes``, fitted by least squares over the
finished teardowns of one policy. With a single TD size there is nothing to fit a line through,
so the TD's own split is used instead: the per-page cost of its PRIVATE_PAGES phase is the
slope and everything else (flushes, CACHE.WB, control-page reclaim) is the fixed part.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

PAGE_BYTES = 4096
GIB = 1 << 30  # "GB" in this analyzer is GiB: TD memory is sized in GiB
NS_PER_S = 1e9
EXTRAPOLATION_GB: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024)

FIT_SCHEMA: dict[str, pl.DataType] = {
    "policy": pl.String(), "tds": pl.Int64(), "method": pl.String(), "fixed_ns": pl.Float64(),
    "ns_per_page": pl.Float64(), "seconds_per_gb": pl.Float64(),
}
EXTRAPOLATION_SCHEMA: dict[str, pl.DataType] = {
    "policy": pl.String(), "gb": pl.Int64(), "seconds": pl.Float64(),
}


@dataclass(frozen=True)
class TeardownFit:
    """The fitted line for one policy."""

    policy: str
    tds: int
    method: str  # "least_squares" (two or more TD sizes) or "single_size"
    fixed_ns: float
    ns_per_byte: float

    @property
    def seconds_per_gb(self) -> float:
        return self.ns_per_byte * GIB / NS_PER_S

    def seconds(self, gb: int) -> float:
        """Predicted teardown time of a TD with ``gb`` GiB of private memory."""
        return (self.fixed_ns + self.ns_per_byte * gb * GIB) / NS_PER_S


def fit_policies(per_td: pl.DataFrame) -> list[TeardownFit]:
    """One fit per policy seen among finished teardowns that had private pages, by policy name.

    ``per_td`` needs: policy, finished, private_pages, teardown_ns, private_pages_ns.
    """
    usable = per_td.filter(pl.col("finished") & (pl.col("private_pages") > 0)).with_columns(
        x=(pl.col("private_pages") * PAGE_BYTES).cast(pl.Float64),
        y=pl.col("teardown_ns").cast(pl.Float64),
        own_slope=pl.col("private_pages_ns") / (pl.col("private_pages") * PAGE_BYTES),
        own_fixed=(pl.col("teardown_ns") - pl.col("private_pages_ns")).cast(pl.Float64),
    )
    dx = pl.col("x") - pl.col("x").mean()
    dy = pl.col("y") - pl.col("y").mean()
    sums = (
        usable.group_by("policy")
        .agg(
            tds=pl.len().cast(pl.Int64),
            sizes=pl.col("x").n_unique().cast(pl.Int64),
            mean_x=pl.col("x").mean(),
            mean_y=pl.col("y").mean(),
            sxx=(dx * dx).sum(),
            sxy=(dx * dy).sum(),
            own_slope=pl.col("own_slope").mean(),
            own_fixed=pl.col("own_fixed").mean(),
        )
        .sort("policy")
    )
    fits: list[TeardownFit] = []
    for row in sums.iter_rows(named=True):  # one row per policy: a handful at most
        if row["sizes"] >= 2:
            slope = row["sxy"] / row["sxx"]
            fits.append(TeardownFit(row["policy"], row["tds"], "least_squares",
                                    row["mean_y"] - slope * row["mean_x"], slope))
        else:
            fits.append(TeardownFit(row["policy"], row["tds"], "single_size",
                                    row["own_fixed"], row["own_slope"]))
    return fits


def fit_table(fits: list[TeardownFit]) -> pl.DataFrame:
    return pl.DataFrame(
        [(f.policy, f.tds, f.method, f.fixed_ns, f.ns_per_byte * PAGE_BYTES, f.seconds_per_gb)
         for f in fits],
        schema=FIT_SCHEMA, orient="row",
    )


def extrapolation_table(fits: list[TeardownFit]) -> pl.DataFrame:
    return pl.DataFrame(
        [(f.policy, gb, f.seconds(gb)) for f in fits for gb in EXTRAPOLATION_GB],
        schema=EXTRAPOLATION_SCHEMA, orient="row",
    )
