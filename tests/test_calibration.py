"""The teardown calibration (docs/calibration.md) reproduces the published figures.

Runs ``bench/calibrate_teardown.py`` at a small size: each of the four [TERM-v5] points must
come out within ±25% when the measured per-page cost is extrapolated to the published size.
"""

from __future__ import annotations

from types import ModuleType

import pytest
from bench_helpers import load_bench


def _bench() -> ModuleType:
    return load_bench("calibrate_teardown")


@pytest.fixture(scope="module")
def points() -> list:  # type: ignore[type-arg]
    return _bench().calibrate(memory_mb=8, seed=3)  # type: ignore[no-any-return]


def test_each_published_point_is_within_25_percent(points: list) -> None:  # type: ignore[type-arg]
    assert [(p.vcpus, p.gb, p.policy) for p in points] == [
        (4, 18, "late"), (4, 18, "early"), (64, 400, "late"), (64, 400, "early")]
    for p in points:
        assert abs(p.residual) <= 0.25, (p, p.model_s)


def test_late_release_grows_with_vcpus_and_early_does_not(points: list) -> None:  # type: ignore[type-arg]
    by = {(p.vcpus, p.policy): p.per_page_ns for p in points}
    # Every page's TRACK kicks all vCPUs: 60 more vCPUs cost 60 x kick_per_vcpu (625 ns) per page.
    assert by[(64, "late")] - by[(4, "late")] == pytest.approx(60 * 625, rel=0.05)
    assert by[(64, "early")] == pytest.approx(by[(4, "early")], rel=0.03)
    assert by[(4, "late")] > 3 * by[(4, "early")]


def test_the_command_prints_the_table_and_succeeds(capsys: pytest.CaptureFixture[str]) -> None:
    assert _bench().main(["--memory-mb", "4"]) == 0
    out = capsys.readouterr().out
    assert "published s" in out and "worst residual" in out
