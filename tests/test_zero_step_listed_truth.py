"""zero_step's listed GPAs equal the TDX module's list, per vCPU (T_ZERO_STEP_GPA truth rows).

The module appends a GPA to the vCPU's list from the 7th private EPT violation at one RIP
(distinct GPAs, at most 32, emptied on progress); the analyzer rebuilds that list from the TD
exits alone. Both policies: under local_retry the runs are short, under resume_guest long.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from tdxtrace.events import Kind
from tdxtrace.sim.emulator import record
from tdxtrace.sim.scenario import load_scenario
from tdxtrace.testing import run_analyzer
from tdxtrace.trace import open_trace


@pytest.mark.parametrize("policy", ["resume_guest", "local_retry"])
@pytest.mark.parametrize(("scenario", "seed"), [("zero-step", 1), ("zero-step", 4), ("demo", 2)])
def test_listed_gpas_per_vcpu_equal_the_modules_list(tmp_path: Path, scenario: str, seed: int,
                                                      policy: str) -> None:
    path = tmp_path / "run.arrow"
    record(load_scenario(scenario, [f"policy.frozen_spte={policy}"]), seed, path)
    module = (pl.read_ipc(path).filter(pl.col("kind") == Kind.T_ZERO_STEP_GPA)
              .group_by("td", "vcpu").agg(pl.len().cast(pl.Int64).alias("listed")))
    incidents = run_analyzer("zero_step", open_trace(path)).tables["incidents"]
    inferred = (incidents.group_by("td", "vcpu").agg(pl.col("listed_gpas").sum().alias("listed"))
                .filter(pl.col("listed") > 0))
    key = ["td", "vcpu"]
    assert sorted(module.iter_rows()) == sorted(inferred.select(*key, "listed").iter_rows())
    if policy == "resume_guest":
        assert module.height > 0  # the story happened: the module listed GPAs
