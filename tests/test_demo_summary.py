"""The three lines ``tdxtrace demo`` prints: figures by name, '?' for what failed."""

from __future__ import annotations

from tdxtrace.analysis import AnalyzerOutcome, AnalyzerResult
from tdxtrace.commands.demo import summary_lines


def _ok(name: str, **metrics: int) -> AnalyzerOutcome:
    return AnalyzerOutcome(name, AnalyzerResult(metrics=dict(metrics)), None)


def test_busy_count_and_chains_are_separate_figures() -> None:
    # 26 BUSYs but only 14 chains: an AUG BUSY that resumes the guest is retried by no one,
    # so the line must not say "26 in 14 retry chains".
    lines = summary_lines("demo, seed 1: 14114 events", [
        _ok("zero_step", incidents=3),
        _ok("busy_retry", busy_total=26, chains=14, max_chain=6),
        _ok("teardown_latency", teardowns=1, max_teardown_ns=5_530_000, hkid_leaks=0),
        _ok("mapgpa", conversions=3, retries=4, giveups=0),
        _ok("zap_scope", sptes_zapped=1045),
    ])
    assert lines == [
        "demo, seed 1: 14114 events; zero-step incidents: 3; OPERAND_BUSY: 26; "
        "retry chains: 14 (longest 6 attempts)",
        "teardowns: 1 (longest 5.53 ms), HKID leaks: 0",
        "MapGPA conversions: 3, RETRYs: 4, give-ups: 0; SPTEs zapped: 1045",
    ]


def test_a_failed_analyzer_shows_question_marks() -> None:
    lines = summary_lines("h", [AnalyzerOutcome("busy_retry", None, "boom")])
    assert "OPERAND_BUSY: ?; retry chains: ? (longest ? attempts)" in lines[0]
    assert lines[1] == "teardowns: ? (longest ?), HKID leaks: ?"


def test_no_chain_and_no_teardown_have_no_longest() -> None:
    lines = summary_lines("h", [
        _ok("zero_step", incidents=0), _ok("busy_retry", busy_total=2, chains=0, max_chain=0),
        _ok("teardown_latency", teardowns=0, max_teardown_ns=0, hkid_leaks=0)])
    assert lines[0] == "h; zero-step incidents: 0; OPERAND_BUSY: 2; retry chains: 0"
    assert lines[1] == "teardowns: 0, HKID leaks: 0"
