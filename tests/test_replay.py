"""`tdxtrace replay`: record -> replay is identical; any change is found at its exact seq.

The model's state at an event (``replay --until``) is tested in test_replay_until.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pytest
from click.testing import CliRunner
from replay_helpers import cli, record_short, record_storm, renumber, rewrite, set_value
from replay_helpers import invoke_replay as _replay
from replay_helpers import page_aug_seq as _aug_row
from replay_helpers import trace_rows as _rows

from tdxtrace.codes import Leaf
from tdxtrace.events import Kind
from tdxtrace.replay import plan_from_metadata, replay_trace
from tdxtrace.schema import META_POLICIES, META_SCENARIO, META_SEED, META_VERSION
from tdxtrace.sim.scenario import builtin_names
from tdxtrace.trace import RunMetadata, open_trace, write_events


@pytest.fixture(scope="module")
def storm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return record_storm(tmp_path_factory.mktemp("storm"))


# --- identical ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", builtin_names())
@pytest.mark.parametrize("seed", [1, 29])
def test_record_then_replay_is_identical_for_every_builtin_scenario(
        tmp_path: Path, name: str, seed: int) -> None:
    path = record_short(tmp_path, name, seed)
    trace = open_trace(path)
    result, _ = replay_trace(trace, plan_from_metadata(trace.metadata, str(path), force=False))
    assert result.divergence is None
    assert trace.summary is not None
    assert (result.events, result.digest) == (trace.summary.events, trace.summary.digest)
    assert result.events > 100 and not result.prefix


def test_replay_in_another_process_folder_and_hash_seed(tmp_path: Path, storm: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shim = ("from replay_helpers import cli; cli()(prog_name='tdxtrace')")
    env = {**os.environ, "PYTHONHASHSEED": "9176",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                          os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", shim, "replay", str(storm)], cwd=elsewhere,
                          env=env, capture_output=True, text=True)
    summary = open_trace(storm).summary
    assert summary is not None
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"identical: {summary.events} events, digest {summary.digest}"


def test_cli_identical_json(storm: Path) -> None:
    result = _replay(storm, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["identical"] is True and doc["divergence"] is None
    assert doc["digest"] == open_trace(storm).summary.digest  # type: ignore[union-attr]


# --- divergence at the exact seq ----------------------------------------------------------

def test_one_altered_field_is_reported_at_its_seq(tmp_path: Path, storm: Path) -> None:
    seq = _aug_row(_rows(storm))
    busy = 0x8000020000000092
    bad = rewrite(storm, tmp_path / "bad.arrow",
                  table=lambda t: set_value(t, "status", seq, busy))
    result = _replay(bad)
    assert result.exit_code == 1
    assert f"divergent at seq {seq}: the events differ" in result.output
    assert "fields that differ: status" in result.output
    status_line = next(line for line in result.output.splitlines() if "status" in line
                       and line.startswith("*"))
    assert "TDX_OPERAND_BUSY|SEPT_TREE" in status_line and "TDX_SUCCESS" in status_line
    doc = json.loads(_replay(bad, "--json").stdout)
    div = doc["divergence"]
    assert (div["seq"], div["fields"]) == (seq, ["status"])
    assert (div["recorded"]["status"], div["replayed"]["status"]) == (busy, 0)


def test_an_altered_row_in_a_later_batch_is_found(tmp_path: Path, storm: Path) -> None:
    rows = _rows(storm)
    seq = rows.height - 17  # batches of 1000 rows in the file: far from the first batch
    bad = rewrite(storm, tmp_path / "bad.arrow",
                  table=lambda t: set_value(t, "ts_ns", seq, t.column("ts_ns")[seq].as_py() + 1))
    div = json.loads(_replay(bad, "--json").stdout)["divergence"]
    assert (div["seq"], div["fields"]) == (seq, ["ts_ns"])


def test_a_deleted_row_diverges_where_it_was(tmp_path: Path, storm: Path) -> None:
    seq = _aug_row(_rows(storm), 55)

    def delete(t: pa.Table) -> pa.Table:
        return renumber(pa.concat_tables([t.slice(0, seq), t.slice(seq + 1)]))

    div = json.loads(_replay(rewrite(storm, tmp_path / "del.arrow", table=delete),
                             "--json").stdout)["divergence"]
    assert div["seq"] == seq
    assert div["replayed"]["leaf"] == int(Leaf.TDH_MEM_PAGE_AUG)


def test_an_inserted_row_diverges_where_it_was_inserted(tmp_path: Path, storm: Path) -> None:
    seq = 321

    def insert(t: pa.Table) -> pa.Table:
        extra = set_value(t.slice(seq, 1), "kind", 0, int(Kind.KICK))
        return renumber(pa.concat_tables([t.slice(0, seq), extra, t.slice(seq)]))

    result = _replay(rewrite(storm, tmp_path / "ins.arrow", table=insert), "--json")
    assert result.exit_code == 1
    div = json.loads(result.stdout)["divergence"]
    assert div["seq"] == seq and "kind" in div["fields"]
    assert div["recorded"]["kind"] == int(Kind.KICK)


def test_a_trace_longer_than_the_replay(tmp_path: Path, storm: Path) -> None:
    rows = _rows(storm)

    def append(t: pa.Table) -> pa.Table:
        return renumber(pa.concat_tables([t, t.slice(t.num_rows - 1, 1)]))

    div = json.loads(_replay(rewrite(storm, tmp_path / "long.arrow", table=append),
                             "--json").stdout)["divergence"]
    assert div["seq"] == rows.height and div["replayed"] is None
    assert "the replay ends after" in div["reason"]


def test_a_trace_shorter_than_the_replay(tmp_path: Path, storm: Path) -> None:
    rows = _rows(storm)
    short = rewrite(storm, tmp_path / "short.arrow", table=lambda t: t.slice(0, 5000))
    result = _replay(short)
    assert result.exit_code == 1
    assert "divergent at seq 5000: the trace ends after 5000 events" in result.output
    assert rows.height > 5000


# --- metadata -----------------------------------------------------------------------------

def _meta(key: str, value: str) -> Any:
    return lambda m: {**m, key: value}


def test_a_tampered_seed_diverges(tmp_path: Path, storm: Path) -> None:
    bad = rewrite(storm, tmp_path / "seed.arrow", metadata=_meta(META_SEED, "4"))
    result = _replay(bad)
    assert result.exit_code == 1 and "divergent at seq" in result.output


def test_tampered_policies_are_refused(tmp_path: Path, storm: Path) -> None:
    policies = json.dumps({"frozen_spte": "resume_guest", "hkid_release": "late",
                           "zap_busy": "kick_retry_once", "zap_scope": "range_leafs"})
    bad = rewrite(storm, tmp_path / "pol.arrow", metadata=_meta(META_POLICIES, policies))
    result = _replay(bad)
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and str(bad) in result.output
    assert "disagrees with the stored scenario's policies" in result.output


def test_a_scenario_that_is_not_json_is_one_line(tmp_path: Path, storm: Path) -> None:
    bad = rewrite(storm, tmp_path / "scn.arrow", metadata=_meta(META_SCENARIO, "{nope"))
    result = _replay(bad)
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert f"{bad}: metadata {META_SCENARIO}" in result.output


def test_another_version_is_refused_unless_forced(tmp_path: Path, storm: Path) -> None:
    old = rewrite(storm, tmp_path / "old.arrow", metadata=_meta(META_VERSION, "0.0.1"))
    refused = _replay(old)
    assert refused.exit_code == 2
    assert "written by tdxtrace 0.0.1" in refused.output and "--force" in refused.output
    forced = _replay(old, "--force")
    assert forced.exit_code == 0
    said, verdict = forced.output.splitlines()
    assert "written by tdxtrace 0.0.1" in said and verdict.startswith("identical: ")


def test_a_tampered_summary_event_count_is_refused_by_the_reader(tmp_path: Path,
                                                                 storm: Path) -> None:
    # The reader compares the count with the rows (the digest does not cover their number),
    # so replay never re-runs a scenario against a summary it cannot trust.
    events = open_trace(storm).num_events()
    bad = rewrite(storm, tmp_path / "count.arrow",
                  summary=_meta("tdxtrace.summary.events", str(events + 1)))
    result = _replay(bad)
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert f"{bad}: damaged trace: the summary says {events + 1} events but the file holds " \
           f"{events}" in result.output


def test_a_tampered_summary_digest_is_refused_by_the_reader(tmp_path: Path,
                                                            storm: Path) -> None:
    bad = rewrite(storm, tmp_path / "dig.arrow",
                  summary=_meta("tdxtrace.summary.digest", "sha256:" + "0" * 64))
    result = _replay(bad)
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert str(bad) in result.output and "digest" in result.output


def test_tampered_truth_counters_are_reported(tmp_path: Path, storm: Path) -> None:
    def truth(m: dict[str, str]) -> dict[str, str]:
        counters = json.loads(m["tdxtrace.summary.truth"])
        counters["faults"] += 1
        return {**m, "tdxtrace.summary.truth": json.dumps(counters)}

    result = _replay(rewrite(storm, tmp_path / "truth.arrow", summary=truth))
    assert result.exit_code == 1 and "ground-truth counters differ: faults" in result.output


# --- unfinished and imported traces -------------------------------------------------------

def test_an_unfinished_trace_is_compared_up_to_its_last_event(
        tmp_path: Path, storm: Path) -> None:
    cut = rewrite(storm, tmp_path / "cut.arrow", table=lambda t: t.slice(0, 4000),
                  keep_summary=False)
    result = CliRunner().invoke(cli(), ["replay", str(cut)])
    assert result.exit_code == 0, result.output
    assert "identical prefix: 4000 events" in result.stdout
    assert "unfinished" in result.stderr


def test_an_unfinished_trace_with_an_altered_row_diverges(tmp_path: Path, storm: Path) -> None:
    def cut_and_alter(t: pa.Table) -> pa.Table:
        return set_value(t.slice(0, 4000), "lp", 3999, 99)

    result = _replay(rewrite(storm, tmp_path / "cut.arrow", table=cut_and_alter,
                             keep_summary=False))
    assert result.exit_code == 1 and "divergent at seq 3999" in result.output


def test_a_trace_cut_short_mid_file_replays_its_complete_batches(
        tmp_path: Path, storm: Path) -> None:
    data = rewrite(storm, tmp_path / "batches.arrow").read_bytes()  # batches of 1000 rows
    cut = tmp_path / "crashed.arrow"
    cut.write_bytes(data[: len(data) * 2 // 3])
    events = open_trace(cut).num_events()
    assert events % 1000 == 0 and events > 0
    result = CliRunner().invoke(cli(), ["replay", str(cut)])
    assert result.exit_code == 0, result.output
    assert f"identical prefix: {events} events" in result.stdout
    assert "damaged tail" in result.stderr


def test_an_unfinished_trace_without_events_is_bad_input(tmp_path: Path, storm: Path) -> None:
    data = storm.read_bytes()  # one batch: cut anywhere, no complete batch is left
    cut = tmp_path / "crashed.arrow"
    cut.write_bytes(data[: len(data) // 2])
    result = _replay(cut)
    assert result.exit_code == 2 and "holds no complete batch of events" in result.output


def test_an_imported_trace_cannot_be_replayed(tmp_path: Path) -> None:
    path = tmp_path / "import.arrow"
    frame = pl.DataFrame({"ts_ns": [0, 5], "kind": [int(Kind.SEAMCALL)] * 2})
    write_events(path, frame, RunMetadata(producer="perf-import"))
    result = _replay(path)
    assert result.exit_code == 2
    assert result.output == (f"tdxtrace: error: {path}: cannot replay: the trace holds no "
                             "scenario to re-run (producer 'perf-import'; only `tdxtrace record` "
                             "stores one)\n")


def test_neither_or_both_inputs_is_a_usage_error(storm: Path) -> None:
    assert CliRunner().invoke(cli(), ["replay"]).exit_code == 2
    both = CliRunner().invoke(cli(), ["replay", str(storm), "--capsule", str(storm)])
    assert both.exit_code == 2
