"""A kick waits for every vCPU in guest mode, one still inside TDH.VP.ENTER included.

tdx-reference.md §4(b): after tdh_do_no_vcpus()'s kick "the retry is guaranteed to succeed
barring KVM/module bugs", because kvm_make_all_cpus_request() waits for each vCPU in guest
mode to take the IPI, and a vCPU inside VP.ENTER (interrupts off) takes it only after its
entry, when the module no longer holds the TD epoch for it. With a VP.ENTER slower than the
kick, the emulator used to let the kicked vCPU exit while its entry still held the epoch: the
retried TRACK was BUSY again and mainline KVM bugged the VM.
"""

from __future__ import annotations

import polars as pl
import pytest
from emulator_helpers import run

from tdxtrace.codes import ExitReason, Leaf
from tdxtrace.events import KickReason, Kind

RUN_NS = 20_000_000
# 16-24 us entries (the default jitter, 20 %, and no tail); a kick takes ~4 us.
SLOW_ENTRY = ("run.duration_us=20000", "costs.vp.enter.base_ns=20000",
              "costs.vp.enter.tail_p=0")
SHORTEST_ENTRY_NS = 16_000
SHORT_KICK = ("run.duration_us=20000", "costs.kick=400", "costs.kick_per_vcpu=0")


@pytest.mark.parametrize("overrides", [SLOW_ENTRY, SHORT_KICK], ids=["slow-entry", "short-kick"])
def test_the_retry_after_the_kick_never_meets_a_vp_enter(overrides: tuple[str, ...]) -> None:
    events, truth = run("zap-under-load", *overrides)
    rows = events.filter(~pl.col("truth")).sort("seq")
    retry_kicks = rows.filter((pl.col("kind") == Kind.KICK)
                              & (pl.col("sub") == KickReason.NO_VCPUS_RETRY))
    assert retry_kicks.height > 0  # the BUSY-then-kick path ran
    assert truth["vms_bugged"] == 0
    assert rows.filter(pl.col("kind") == Kind.VM_BUGGED).is_empty()
    # Each zap SEAMCALL right after such a kick (its one retry) succeeded.
    after_kick = rows.with_columns(
        kicked=((pl.col("kind") == Kind.KICK) & (pl.col("sub") == KickReason.NO_VCPUS_RETRY))
        .shift(1).over("corr")
    ).filter(pl.col("kicked") & (pl.col("kind") == Kind.SEAMCALL))
    assert after_kick.height == retry_kicks.height
    assert after_kick["status"].eq(0).all(), after_kick.select("seq", "leaf", "status")


def test_a_vcpu_kicked_while_entering_exits_after_its_entry() -> None:
    events, _ = run("zap-under-load", *SLOW_ENTRY)
    rows = events.filter(~pl.col("truth")).sort("seq")
    # Until the run's end, where every vCPU is stopped at once (not a kick).
    running = rows.filter(pl.col("ts_ns") < RUN_NS)
    entered = running.filter(pl.col("kind") == Kind.TD_ENTRY).select(
        "td", "vcpu", pl.col("ts_ns").alias("entry_ns"), pl.col("seq").alias("entry_seq"))
    exits = running.filter((pl.col("kind") == Kind.TD_EXIT) & (pl.col("leaf") == Leaf.TDH_VP_ENTER))
    paired = exits.join_asof(entered, left_on="seq", right_on="entry_seq", by=["td", "vcpu"],
                             strategy="backward", check_sortedness=False)
    kicked = paired.filter(pl.col("exit_reason") == ExitReason.EXTERNAL_INTERRUPT)
    assert kicked.height > 0
    # No TD exit comes before the end of its VP.ENTER's entry (16 us or more after TD_ENTRY).
    assert (paired["ts_ns"] - paired["entry_ns"]).min() >= SHORTEST_ENTRY_NS
