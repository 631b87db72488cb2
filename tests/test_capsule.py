"""Reproduction capsules: a small file that replays a run elsewhere and checks its digest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from click.testing import CliRunner
from replay_helpers import cli, record_short, rewrite

from tdxtrace.events import Kind
from tdxtrace.trace import RunMetadata, open_trace, write_events


def _run(*args: str) -> Any:
    return CliRunner().invoke(cli(), list(args))


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return record_short(tmp_path_factory.mktemp("capsule"), "zap-under-load", 11)


@pytest.fixture()
def capsule(tmp_path: Path, traced: Path) -> Path:
    out = tmp_path / "run.capsule.json"
    result = _run("capsule", str(traced), "-o", str(out))
    assert result.exit_code == 0, result.output
    return out


def _edit(path: Path, **changes: Any) -> Path:
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc.update(changes)
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def test_capsule_is_small_and_holds_the_run(traced: Path, capsule: Path) -> None:
    summary = open_trace(traced).summary
    assert summary is not None
    doc = json.loads(capsule.read_text(encoding="utf-8"))
    assert capsule.stat().st_size < 8192 < traced.stat().st_size
    assert (doc["format"], doc["capsule_version"], doc["seed"]) == ("tdxtrace-capsule", 1, 11)
    assert (doc["events"], doc["digest"], doc["truth"]) == (summary.events, summary.digest,
                                                           summary.truth)
    assert doc["scenario"]["name"] == "zap-under-load"
    assert doc["scenario"]["run"]["duration_us"] == 1500


def test_capsule_bytes_are_deterministic(tmp_path: Path, traced: Path, capsule: Path) -> None:
    again = tmp_path / "again.json"
    assert _run("capsule", str(traced), "-o", str(again)).exit_code == 0
    assert again.read_bytes() == capsule.read_bytes()


def test_capsule_replays_without_the_trace_elsewhere(tmp_path: Path, traced: Path,
                                                     capsule: Path) -> None:
    elsewhere = tmp_path / "other-machine"
    elsewhere.mkdir()
    moved = elsewhere / "bug.capsule.json"
    moved.write_bytes(capsule.read_bytes())
    env = {**os.environ, "PYTHONHASHSEED": "31337",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                          os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", "from replay_helpers import cli; cli()(prog_name='tdxtrace')",
         "replay", "--capsule", moved.name], cwd=elsewhere, env=env, capture_output=True,
        text=True)
    summary = open_trace(traced).summary
    assert summary is not None
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"identical: {summary.events} events, digest {summary.digest}\n"


def test_a_wrong_digest_in_the_capsule_is_a_divergence(capsule: Path) -> None:
    _edit(capsule, digest="sha256:" + "1" * 64)
    result = _run("replay", "--capsule", str(capsule))
    assert result.exit_code == 1
    assert "the capsule says digest sha256:111" in result.output
    assert "replay the trace itself" in result.output


def test_a_wrong_event_count_in_the_capsule_is_a_divergence(capsule: Path) -> None:
    recorded = json.loads(capsule.read_text())["events"]
    _edit(capsule, events=recorded + 1)
    result = _run("replay", "--capsule", str(capsule))
    assert result.exit_code == 1
    assert (f"the capsule says {recorded + 1} events; the replay produced {recorded}"
            in result.output)


def test_a_changed_seed_in_the_capsule_is_a_divergence(capsule: Path) -> None:
    _edit(capsule, seed=12)
    result = _run("replay", "--capsule", str(capsule), "--json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["identical"] is False and doc["divergence"]["seq"] is None


def test_another_version_is_refused_unless_forced(capsule: Path) -> None:
    _edit(capsule, tdxtrace_version="9.9")
    refused = _run("replay", "--capsule", str(capsule))
    assert refused.exit_code == 2 and "written by tdxtrace 9.9" in refused.output
    forced = _run("replay", "--capsule", str(capsule), "--force")
    assert forced.exit_code == 0 and "identical: " in forced.stdout
    assert "written by tdxtrace 9.9" in forced.stderr


def test_capsule_until_shows_unchecked_state(capsule: Path) -> None:
    result = _run("replay", "--capsule", str(capsule), "--until", "700", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["checked"] is False and doc["state"]["seq"] == 700
    assert doc["state"]["event"] is None and doc["state"]["tds"]
    beyond = _run("replay", "--capsule", str(capsule), "--until", "10000000")
    assert beyond.exit_code == 2 and "the run ends before event 10000000" in beyond.output


@pytest.mark.parametrize(("content", "message"), [
    ("not json", "not a tdxtrace capsule (not JSON)"),
    ('{"format": "something"}', "not a tdxtrace capsule"),
    ('{"format": "tdxtrace-capsule", "capsule_version": 2}', "capsule version 2 is not"),
])
def test_bad_capsule_files_are_one_line_errors(tmp_path: Path, content: str,
                                               message: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content, encoding="utf-8")
    result = _run("replay", "--capsule", str(bad))
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and f"{bad}: {message}" in result.output


def test_a_missing_capsule_key_is_named(capsule: Path) -> None:
    doc = json.loads(capsule.read_text(encoding="utf-8"))
    del doc["seed"]
    capsule.write_text(json.dumps(doc), encoding="utf-8")
    result = _run("replay", "--capsule", str(capsule))
    assert result.exit_code == 2 and "capsule key 'seed' is missing" in result.output


def test_no_capsule_of_an_unfinished_trace(tmp_path: Path, traced: Path) -> None:
    cut = rewrite(traced, tmp_path / "cut.arrow", table=lambda t: t.slice(0, 3000),
                  keep_summary=False)
    result = _run("capsule", str(cut))
    assert result.exit_code == 2 and "the trace is unfinished" in result.output


def test_no_capsule_of_an_imported_trace(tmp_path: Path) -> None:
    path = tmp_path / "import.arrow"
    write_events(path, pl.DataFrame({"ts_ns": [1], "kind": [int(Kind.TD_EXIT)]}),
                 RunMetadata(producer="perf-import"))
    result = _run("capsule", str(path))
    assert result.exit_code == 2
    assert "cannot make a capsule: no scenario" in result.output


def test_capsule_output_is_not_overwritten_without_force(traced: Path, capsule: Path) -> None:
    before = capsule.read_bytes()
    refused = _run("capsule", str(traced), "-o", str(capsule))
    assert refused.exit_code == 2 and "already exists" in refused.output
    assert _run("capsule", str(traced), "-o", str(capsule), "--force").exit_code == 0
    assert capsule.read_bytes() == before
    assert not capsule.with_name(capsule.name + ".partial").exists()


def test_default_capsule_name_sits_beside_the_trace(tmp_path: Path, traced: Path) -> None:
    copy = tmp_path / "bug.arrow"
    copy.write_bytes(traced.read_bytes())
    result = _run("capsule", str(copy))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "bug.arrow.capsule.json").is_file()
    assert result.stdout.startswith(f"{tmp_path / 'bug.arrow.capsule.json'}: capsule of ")
