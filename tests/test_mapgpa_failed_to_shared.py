"""A guest whose conversion to shared fails never converts that range back to private.

Linux's set_memory_decrypted() failing leaks the range (it is in no known state); the
"alternate" guest model used to convert it back to private on its next turn as if the
conversion had worked.
"""

from __future__ import annotations

import polars as pl
import pytest
from emulator_helpers import run

from tdxtrace.events import GuestMapGpa, Kind
from tdxtrace.sim.roots_guest import SHARED_BIT


@pytest.mark.parametrize("vmm", ["no_progress", "reject"])
def test_a_failed_conversion_to_shared_is_not_converted_back(vmm: str) -> None:
    events, truth = run("mapgpa-convert", "run.duration_us=20000", f"mapgpa.vmm={vmm}")
    guest = events.filter(pl.col("kind") == Kind.GUEST_MAPGPA).sort("seq")
    starts = guest.filter(pl.col("sub") == GuestMapGpa.START).select(
        "corr", "td", "vcpu", (pl.col("gpa") & ~SHARED_BIT).alias("start"),
        pl.col("arg1").alias("to_private"), "seq")
    endings = guest.filter(pl.col("sub") != GuestMapGpa.START).group_by("corr").agg(
        pl.col("sub").last().alias("ending"))
    convs = starts.join(endings, on="corr", how="left")
    failed_to_shared = convs.filter((pl.col("to_private") == 0)
                                    & (pl.col("ending") != GuestMapGpa.DONE))
    assert failed_to_shared.height > 0, "the VMM made no conversion fail"
    back = convs.filter(pl.col("to_private") == 1).select("td", "start", "seq")
    converted_back = failed_to_shared.join(back, on=["td", "start"], suffix="_back").filter(
        pl.col("seq_back") > pl.col("seq"))
    assert converted_back.is_empty(), converted_back
    assert truth["mapgpa_conversions"] == convs.height
