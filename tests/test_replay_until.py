"""`tdxtrace replay --until`: the model's state when an event was written, as text or JSON.

At a PAGE.AUG its page is pending, its locks held and its SPTE frozen; after a guest accept the
page is mapped; a vCPU shows zero-step armed with its count. The state equals the library's
snapshot, keys sorted; a seq past the end is bad input, and a divergence before it is reported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from replay_helpers import invoke_replay as _replay
from replay_helpers import page_aug_seq as _aug_row
from replay_helpers import record_short, record_storm, rewrite, set_value
from replay_helpers import trace_rows as _rows

from tdxtrace.codes import Leaf
from tdxtrace.events import Kind, ZapReason
from tdxtrace.replay import plan_from_metadata, replay_trace, snapshot
from tdxtrace.trace import open_trace


@pytest.fixture(scope="module")
def storm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return record_storm(tmp_path_factory.mktemp("storm"))


# --- --until: the model's state at an event -----------------------------------------------

def _until(path: Path, seq: int) -> dict[str, Any]:
    result = _replay(path, "--until", str(seq), "--json")
    assert result.exit_code == 0, result.output
    doc: dict[str, Any] = json.loads(result.stdout)
    assert doc["checked"] is True
    return doc["state"]  # type: ignore[no-any-return]


def _covers(ranges: list[list[int]], gpa: int) -> bool:
    return any(start <= gpa < start + pages * 4096 for start, pages in ranges)


def test_until_a_page_aug_shows_the_pending_page_its_locks_and_frozen_spte(
        storm: Path) -> None:
    rows = _rows(storm)
    seq = _aug_row(rows, 60)
    row = rows.row(seq, named=True)
    state = _until(storm, seq)
    assert state["seq"] == seq and state["event"] == row
    assert state["time_ns"] == row["ts_ns"]
    td = state["tds"][row["td"]]
    assert _covers(td["sept_leaves"]["PENDING"]["ranges"], row["gpa"])
    holders = {(lock["lock"], lock["mode"]): lock for lock in td["locks_held"]}
    tdr = holders[("TDR", "shared")]
    assert tdr["until_ns"] >= row["ts_ns"] + row["dur_ns"]
    entry = next(lock for lock in td["locks_held"]
                 if lock["lock"] == "SEPT_ENTRY" and lock["gpa"] == row["gpa"])
    assert entry["holder"]["corr"] == row["corr"]
    assert entry["until_ns"] == row["ts_ns"] + row["dur_ns"]
    assert {"level": 0, "gpa": row["gpa"], "corr": row["corr"]} in td["frozen_sptes"]
    # As text, the level comes with its page size: KVM counts levels from 1 (PG_LEVEL_4K).
    text = _replay(storm, "--until", str(seq))
    assert f"{row['gpa']:#x} level 0 (4K) (corr {row['corr']})" in text.stdout, text.stdout


def test_until_a_guest_accept_shows_the_page_mapped(storm: Path) -> None:
    rows = _rows(storm)
    accept = rows.filter((pl.col("kind") == int(Kind.GUEST_ACCEPT)) & (pl.col("status") == 0))
    row = accept.row(30, named=True)
    state = _until(storm, row["seq"])
    leaves = state["tds"][row["td"]]["sept_leaves"]
    assert _covers(leaves["MAPPED"]["ranges"], row["gpa"])
    assert not _covers(leaves.get("PENDING", {"ranges": []})["ranges"], row["gpa"])


def test_until_zero_step_armed_shows_the_vcpu_armed(tmp_path: Path) -> None:
    path = record_short(tmp_path, "zero-step", 1)
    rows = _rows(path)
    armed = rows.filter(pl.col("kind") == int(Kind.T_ZERO_STEP_ARMED))
    assert armed.height, "the zero-step scenario should arm zero-step within 1.5 ms"
    row = armed.row(0, named=True)
    state = _until(path, row["seq"])
    vcpu = state["tds"][row["td"]]["vcpus"][row["vcpu"]]
    assert vcpu["zero_step"]["armed"] is True and vcpu["zero_step"]["count"] == 6
    # At the vCPU's last entry before the exit that armed it, five faults were counted.
    entries = rows.filter((pl.col("kind") == int(Kind.TD_ENTRY)) & (pl.col("seq") < row["seq"])
                          & (pl.col("td") == row["td"]) & (pl.col("vcpu") == row["vcpu"]))
    before = _until(path, int(entries["seq"][-1]))["tds"][row["td"]]["vcpus"][row["vcpu"]]
    assert before["zero_step"] == {"armed": False, "count": 5, "gpas": []}


def test_until_state_is_deterministic_and_sorted(storm: Path) -> None:
    state = snapshot_via_library(storm, 2500)
    assert state == _until(storm, 2500)

    def check_sorted(value: Any) -> None:
        if isinstance(value, dict):
            assert list(value) == sorted(value)
            for v in value.values():
                check_sorted(v)
        elif isinstance(value, list):
            for v in value:
                check_sorted(v)

    check_sorted(state)


def snapshot_via_library(path: Path, seq: int) -> dict[str, Any]:
    trace = open_trace(path)
    result, world = replay_trace(trace, plan_from_metadata(trace.metadata, str(path),
                                                           force=False), until=seq)
    assert world is not None and result.events == seq + 1
    return snapshot(world, seq, _rows(path).row(seq, named=True))


def test_until_text_names_the_event_and_each_vcpu(storm: Path) -> None:
    result = _replay(storm, "--until", "1200")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("state when seq 1200 was written, at ")
    assert "event 1200: " in result.output
    assert result.output.count("  vCPU ") == 8 and "TLB epoch" in result.output


def test_until_past_the_end_is_bad_input(storm: Path) -> None:
    events = open_trace(storm).num_events()
    result = _replay(storm, "--until", str(events))
    assert result.exit_code == 2
    assert f"--until {events}: the trace has {events} events (seq 0..{events - 1})" in \
        result.output


def test_until_reports_a_divergence_before_seq(tmp_path: Path, storm: Path) -> None:
    bad = rewrite(storm, tmp_path / "bad.arrow", table=lambda t: set_value(t, "lp", 100, 42))
    result = _replay(bad, "--until", "3000")
    assert result.exit_code == 1 and "divergent at seq 100" in result.output


def test_until_a_conversion_zap_shows_slots_lock_held(tmp_path: Path) -> None:
    # The VMM's KVM_SET_MEMORY_ATTRIBUTES holds slots_lock for its whole zap; between two
    # conversions the lock is free.
    path = record_short(tmp_path, "zap-under-load", 1)
    rows = _rows(path)
    zaps = rows.filter((pl.col("kind") == Kind.ZAP) & (pl.col("sub") == ZapReason.CONVERSION))
    first = zaps.row(0, named=True)
    during = _until(path, first["seq"])["tds"][first["td"]]["slots_lock"]
    assert during == {"held": True, "waiters": 0}
    before = _until(path, first["seq"] - 1)["tds"][first["td"]]["slots_lock"]
    assert before == {"held": False, "waiters": 0}
    text = _replay(path, "--until", str(first["seq"]))
    assert text.exit_code == 0, text.output
    assert "  slots_lock: held\n" in text.stdout


def test_until_the_last_event_shows_the_hkid_freed_only_after_key_freeid(storm: Path) -> None:
    events = open_trace(storm).events().collect()
    freeid = events.filter((pl.col("kind") == Kind.SEAMCALL)
                           & (pl.col("leaf") == Leaf.TDH_MNG_KEY_FREEID))["seq"][0]
    before, after = _until(storm, freeid - 1), _until(storm, events.height - 1)
    assert [td["hkid_freed"] for td in before["tds"]] == [False]
    assert [td["hkid_freed"] for td in after["tds"]] == [True]
    text = _replay(storm, "--until", str(events.height - 1)).output
    assert "TD 0: hkid 1 (freed), TEARDOWN" in text
