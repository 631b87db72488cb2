"""guest.tick_exit: a timer handler that exits (TDVMCALL<WRMSR> at its own RIP) after each tick.

KVM remaps the TDCALL exit by its leaf: the trace (as kvm_exit) shows MSR_WRITE, while
VP.ENTER's status keeps the raw reason, TDCALL (tdx-reference.md §3.1).

A Linux guest re-arms its TSC-deadline timer from the handler, and that #VE-made TDVMCALL is an
exit at another RIP, which resets the module's zero-step count (tdx-reference.md §5.1). So a
fault that KVM's local retry leaves for a pending tick cannot pile up at one RIP the way it
does with a handler that makes no exit (the default, and zap-under-load's premise).
"""

from __future__ import annotations

import polars as pl
from emulator_helpers import run

from tdxtrace.codes import EXIT_REASON_INVALID, ExitReason
from tdxtrace.events import FaultOutcome, Kind
from tdxtrace.sim.guest import TICK_HANDLER_RIP

TDCALL = int(ExitReason.TDCALL)
MSR_WRITE = int(ExitReason.MSR_WRITE)
HANDLER = "guest.tick_exit='tdvmcall'"
SHORT = "run.duration_us=8000"


def _handler_exits(events: pl.DataFrame) -> pl.DataFrame:
    exits = events.filter((pl.col("kind") == Kind.TD_EXIT) & (pl.col("exit_reason") == MSR_WRITE))
    # Only the handler's WRMSR exits so: at its RIP, with TDCALL in the raw status.
    assert set(exits["rip"].to_list()) <= {TICK_HANDLER_RIP}
    assert set((exits["status"] % (1 << 32)).to_list()) <= {TDCALL}
    return exits


def test_each_taken_tick_is_followed_by_one_handler_exit_and_an_entry_in_the_handler() -> None:
    events, _ = run("zap-under-load", SHORT, HANDLER)
    observable = events.filter(~pl.col("truth")).sort("seq")
    run_rows = observable.filter(pl.col("kind").is_in([Kind.TD_ENTRY, Kind.TD_EXIT])
                                 | ((pl.col("kind") == Kind.FAULT_DONE)
                                    & (pl.col("sub") == FaultOutcome.PENDING_EVENT)))
    handler = _handler_exits(observable)
    assert handler.height > 0
    per_vcpu = run_rows.with_columns(
        pl.col("kind").shift(-1).over("vcpu").alias("next_kind"),
        pl.col("rip").shift(-1).over("vcpu").alias("next_rip"),
    )
    after = per_vcpu.join(handler.select("seq"), on="seq", how="semi")
    # The fastpath re-enters the guest in its handler (guest_rip_on_tdentry is the handler's),
    # unless the run ended right after the exit.
    vcpus = events.get_column("vcpu").drop_nulls().n_unique()
    entered = after.filter(pl.col("next_kind").is_not_null())
    assert handler.height - entered.height <= vcpus
    assert entered["next_kind"].to_list() == [Kind.TD_ENTRY] * entered.height
    assert set(entered["next_rip"].to_list()) == {TICK_HANDLER_RIP}
    # No handler exit is taken for a MapGPA: KVM handles it on the fastpath, no TDVMCALL row.
    assert observable.filter(pl.col("kind") == Kind.TDVMCALL).height == 0
    # Each handler exit follows a tick the guest took: the vCPU's last event before it (entries
    # and VP.ENTER's BUSY pseudo-exits aside) is an interrupt exit (a tick, or a kick followed
    # by the tick) or a fault KVM finished before re-entering.
    before = observable.filter(
        pl.col("kind").is_in([Kind.TD_EXIT, Kind.FAULT_DONE])
        & (pl.col("exit_reason").is_null() | (pl.col("exit_reason") != EXIT_REASON_INVALID))
    ).with_columns(pl.col("kind").shift(1).over("vcpu").alias("prev_kind"),
                   pl.col("exit_reason").shift(1).over("vcpu").alias("prev_reason"))
    prev = before.join(handler.select("seq"), on="seq", how="semi")
    interrupt = (pl.col("prev_kind") == Kind.TD_EXIT) & (
        pl.col("prev_reason") == int(ExitReason.EXTERNAL_INTERRUPT))
    assert prev.filter(~(interrupt | (pl.col("prev_kind") == Kind.FAULT_DONE))).height == 0


def test_the_default_handler_makes_no_exit() -> None:
    events, _ = run("zap-under-load", SHORT)
    assert _handler_exits(events).height == 0


# zap-under-load's zero-step incidents with and without an exiting handler:
# test_zap_yields.test_zap_under_load_zero_step_rests_on_both_defaults.


def test_a_handler_exit_during_a_conversion_is_not_taken_for_its_mapgpa() -> None:
    # A MapGPA that KVM answered RETRY (a tick pending) waits for the guest to take the tick
    # and re-issue it: the handler's TDVMCALL in between is the fastpath's, not a MapGPA.
    events, truth = run("mapgpa-convert", SHORT, HANDLER)
    observable = events.filter(~pl.col("truth"))
    tdcalls = observable.filter((pl.col("kind") == Kind.TD_EXIT)
                                & (pl.col("exit_reason") == TDCALL))
    handler = _handler_exits(observable)
    assert handler.height > 0 and truth["mapgpa_retries_interrupt"] > 0
    mapgpa_calls = observable.filter(pl.col("kind") == Kind.TDVMCALL)
    assert mapgpa_calls.height == tdcalls.height > 0  # every TDCALL exit left is a MapGPA
