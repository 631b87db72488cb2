"""`tdxtrace record` and `tdxtrace scenarios`: determinism, scenarios, overrides, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tdxtrace.cli import main
from tdxtrace.sim.scenario import builtin_names, load_scenario

SHORT = ("--set", "run.duration_us=3000")


def _record_in_subprocess(tmp: Path, name: str, hashseed: str, seed: int = 3) -> bytes:
    out = tmp / f"{name}-{hashseed}.arrow"
    env = {**os.environ, "PYTHONHASHSEED": hashseed}
    subprocess.run([sys.executable, "-m", "tdxtrace", "record", name, "--seed", str(seed),
                    *SHORT, "-o", str(out)], check=True, env=env, cwd=tmp,
                   capture_output=True)
    return out.read_bytes()


@pytest.mark.parametrize("name", ["zero-step", "zap-under-load"])
def test_same_scenario_and_seed_give_byte_identical_traces_across_processes(
        tmp_path: Path, name: str) -> None:
    first = _record_in_subprocess(tmp_path, name, "1")
    second = _record_in_subprocess(tmp_path, name, "4242")
    assert first == second


def test_a_different_seed_gives_a_different_trace(tmp_path: Path) -> None:
    runner = CliRunner()
    digests = []
    for seed in (1, 2):
        out = tmp_path / f"s{seed}.arrow"
        result = runner.invoke(main, ["record", "fault-storm", "--seed", str(seed), *SHORT,
                                      "-o", str(out)])
        assert result.exit_code == 0, result.output
        info = runner.invoke(main, ["info", str(out), "--json"])
        digests.append(json.loads(info.output)["digest"])
    assert digests[0] != digests[1]


def test_record_writes_truth_counters_that_info_shows(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "run.arrow"
    result = runner.invoke(main, ["record", "zero-step", *SHORT, "-o", str(out)])
    assert result.exit_code == 0, result.output
    info = json.loads(runner.invoke(main, ["info", str(out), "--json"]).output)
    truth = info["truth"]
    for key in ("zero_step_incidents", "busy_total", "busy_by_leaf_operand", "local_retries",
                "faults", "zaps"):
        assert key in truth
    assert truth["faults"] > 0
    assert info["scenario"] == "zero-step" and info["finished"] is True


def test_record_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "run.arrow"
    out.write_bytes(b"precious")
    result = runner.invoke(main, ["record", "zero-step", *SHORT, "-o", str(out)])
    assert result.exit_code == 2
    assert out.read_bytes() == b"precious"
    assert not list(tmp_path.glob("*.partial"))


def test_scenarios_lists_every_builtin_with_a_description() -> None:
    result = CliRunner().invoke(main, ["scenarios"])
    assert result.exit_code == 0
    lines = result.output.strip().splitlines()
    assert [line.split()[0] for line in lines] == builtin_names()
    assert {"fault-storm", "zero-step", "zap-under-load"} <= set(builtin_names())
    assert all(len(line.split(None, 1)) == 2 for line in lines)


@pytest.mark.parametrize(("override", "needle"), [
    ("td.vcpus=-1", "td.vcpus"),
    ("td.vcpus='four'", "td.vcpus"),
    ("policy.frozen_spte='maybe'", "allowed: local_retry, resume_guest"),
    ("td.memory_mb=999999999", "limit"),
    ("td.colour=3", "unknown key td.colour"),
    ("nonsense=1", "unknown section or key 'nonsense'"),
    # The guest's time is counted in touches: 0 ns divided by zero (a traceback before).
    ("costs.guest_touch=0", "costs.guest_touch.base_ns: 0 is outside [1, 1e+12]"),
])
def test_bad_overrides_are_one_line_errors_naming_the_key(override: str, needle: str) -> None:
    result = CliRunner().invoke(main, ["record", "zero-step", "--set", override, "-o",
                                       "never.arrow"])
    assert result.exit_code == 2
    assert needle in result.output
    assert "Traceback" not in result.output


def test_a_users_toml_file_works_like_a_builtin(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\ndescription = "x"\n[td]\nvcpus = 2\n[run]\n'
                    'duration_us = 500\n')
    scenario = load_scenario(str(path), ["guest.workload='random'"])
    assert scenario.name == "mine" and scenario.td.vcpus == 2
    assert scenario.guest.workload == "random"
    bad = tmp_path / "bad.toml"
    bad.write_text("[td\n")
    result = CliRunner().invoke(main, ["record", str(bad)])
    assert result.exit_code == 2 and "not valid TOML" in result.output
