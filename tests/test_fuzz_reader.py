"""The trace reader under attack: a generated corpus of damaged files, then hypothesis.

Every damaged file must end in a one-line error naming the file, or in a correct partial read
(the events are the first rows of the good trace, and a warning says something is missing);
never a traceback, never a hang, never memory far beyond the file's size. The corpus runs in a
child process with a time limit, so a hang or a crash of the process (polars aborts on some
damaged files it is handed directly) is a failure here, not the end of the test run.

The figures (cases tried, outcomes, failures) are printed at the end of this module's tests
and quoted in ``docs/reliability.md``. ``TDXTRACE_FUZZ_EXAMPLES`` raises the hypothesis budget
for a longer local run; the default keeps this file well under a minute on two cores.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from fuzz_corpus import Base, Case, build_corpus, check_case, make_bases, message_ends
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdxtrace.cli import main
from tdxtrace.errors import TraceFormatError
from tdxtrace.trace import open_trace

FUZZ_EXAMPLES = int(os.environ.get("TDXTRACE_FUZZ_EXAMPLES", "200"))
CORPUS_TIME_LIMIT_S = 120  # the corpus takes ~15 s on a loaded 2-core machine
RSS_GROWTH_LIMIT_MB = 64  # the largest corpus file is ~16 MB (the huge dictionary)
TESTS = Path(__file__).parent
FIGURES: Counter[str] = Counter()
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module", autouse=True)
def print_figures(pytestconfig: pytest.Config) -> Iterator[None]:
    """Print the figures docs/reliability.md quotes, once this module's tests have run."""
    yield
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not FIGURES:
        return
    with capture.global_and_fixture_disabled():  # shown even when output is captured
        reporter.ensure_newline()
        reporter.write_line("fuzz figures: " + ", ".join(
            f"{name} {count}" for name, count in sorted(FIGURES.items())))


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Base]:
    return make_bases(tmp_path_factory.mktemp("bases"))


_CORPUS_RUNNER = textwrap.dedent("""
    import json, sys
    from collections import Counter
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from fuzz_corpus import build_corpus, check_case, expected_events

    def status_mb(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024

    bases, cases = build_corpus(Path(sys.argv[2]))
    check_case(cases[0], expected_events(cases[0], bases))  # load every library once
    # Reset the peak (VmHWM) to the current RSS, so building the corpus does not count.
    Path("/proc/self/clear_refs").write_text("5")
    baseline = status_mb("VmRSS")
    outcomes, failures = Counter(), []
    for case in cases:
        try:
            outcomes[case.expect + "->" + check_case(case, expected_events(case, bases))] += 1
        except BaseException as err:  # everything, PanicException included, is a failure
            failures.append(f"{case.name}: {type(err).__name__}: {err}"[:500])
    largest = max(c.path.stat().st_size for c in cases if c.path.is_file()
                  and not c.path.is_fifo())
    print(json.dumps({"cases": len(cases), "outcomes": outcomes, "failures": failures,
                      "baseline_mb": baseline, "peak_mb": status_mb("VmHWM"),
                      "largest_file_mb": largest / 2**20}))
""")


def test_every_damaged_file_in_the_corpus_gives_an_error_or_a_correct_partial_read(
        tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", _CORPUS_RUNNER, str(TESTS), str(tmp_path)],
                          capture_output=True, text=True, timeout=CORPUS_TIME_LIMIT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["failures"] == []
    outcomes = Counter(result["outcomes"])
    # The corpus covers what it says: each expectation met, and bit flips land on all sides.
    assert outcomes["error->error"] >= 20 and outcomes["partial->partial"] >= 150
    assert outcomes["full->full"] == 5
    assert outcomes["any->error"] >= 300 and outcomes["any->full"] >= 100
    # Cut or damaged after the summary (the footer): every event, checked by the digest.
    assert outcomes["whole->full"] >= 10 and outcomes["any->full"] >= 200
    assert result["cases"] >= 800
    growth = result["peak_mb"] - result["baseline_mb"]
    assert growth < RSS_GROWTH_LIMIT_MB, result
    for outcome, count in outcomes.items():
        FIGURES["corpus " + outcome] += count
    FIGURES["corpus cases"] += result["cases"]
    FIGURES["corpus failures"] += len(result["failures"])
    FIGURES["corpus peak RSS growth MB"] = round(growth)


def _family(case: Case) -> str:
    return re.sub(r"-?\d+", "", case.name.replace(case.base, "", 1))


def test_the_cli_answers_every_kind_of_damage_in_one_line(tmp_path: Path) -> None:
    _, cases = build_corpus(tmp_path)
    samples: dict[str, Case] = {}
    for case in cases:
        samples.setdefault(_family(case) + case.expect, case)
    assert len(samples) >= 40
    runner = CliRunner()
    for case in samples.values():
        info = runner.invoke(main, ["info", "--json", str(case.path)])
        assert info.exit_code in (0, 2), (case.name, info.output)
        assert "Traceback" not in info.output
        if info.exit_code == 2:
            assert info.stdout == "" and info.stderr.count("\n") == 1, (case.name, info.stderr)
            assert info.stderr.startswith(f"tdxtrace: error: {case.path}: ")
            continue
        facts = json.loads(info.stdout)
        assert facts["finished"] == (facts["digest"] is not None)
        analyze = runner.invoke(main, ["analyze", "--format", "json", str(case.path)])
        lines = [line for line in analyze.stderr.splitlines() if line]
        if not facts["finished"] and facts["events"] == 0:
            # Nothing could be read: refused in one error line after the warnings.
            assert analyze.exit_code == 2 and analyze.stdout == "", (case.name, analyze.output)
            assert lines[-1] == (f"tdxtrace: error: {case.path}: nothing to analyze: the trace "
                                 "is unfinished and holds no complete batch of events")
            lines = lines[:-1]
        else:
            assert analyze.exit_code == 0, (case.name, analyze.output)
        warnings = lines
        assert all(line.startswith("tdxtrace: warning: ") for line in warnings)
        assert len(warnings) == len(facts["warnings"])
        if not facts["finished"]:
            assert any("unfinished" in line or "damaged" in line for line in warnings)
    FIGURES["cli cases"] += len(samples)


def _apply(data: bytes, operations: list[tuple[str, int, bytes]]) -> bytes:
    damaged = bytearray(data)
    for operation, where, payload in operations:
        at = where % max(1, len(damaged))
        if operation == "flip" and damaged:
            damaged[at] ^= payload[0] or 1
        elif operation == "cut":
            del damaged[at:]
        elif operation == "overwrite":
            damaged[at:at + len(payload)] = payload
        elif operation == "insert":
            damaged[at:at] = payload
        elif operation == "delete":
            del damaged[at:at + len(payload)]
    return bytes(damaged)


OPERATION = st.tuples(
    st.sampled_from(["flip", "flip", "cut", "overwrite", "insert", "delete"]),
    st.integers(0, 1 << 20), st.binary(min_size=1, max_size=24))
FINISHED = st.sampled_from(["finished-zstd", "finished-lz4", "finished-none"])


def _damaged_case(folder: Path, base: Base, data: bytes) -> Case:
    path = folder / "damaged.arrow"
    path.write_bytes(data)
    return Case("hypothesis", path, "any", base.name)


def _survives(path: Path) -> str:
    """The guarantee when nothing can vouch for the values: an error or a consistent read."""
    try:
        trace = open_trace(path)
    except TraceFormatError as err:
        assert str(err).startswith(f"{path}: ") and "\n" not in str(err)
        return "error"
    events = trace.events().collect()
    assert events.height == trace.num_events() == sum(
        b.num_rows for b in trace.iter_batches())
    assert trace.finished or trace.warnings
    return "read"


@FUZZ
@given(name=FINISHED, operation=OPERATION)
def test_one_damage_to_a_finished_trace_is_an_error_or_a_correct_partial_read(
        bases: dict[str, Base], tmp_path_factory: pytest.TempPathFactory, name: str,
        operation: tuple[str, int, bytes]) -> None:
    # The batches before the damage are untouched, and the digest catches a flipped bit that
    # still decodes, so whatever is read must be exactly the first rows of the good trace.
    base = bases[name]
    case = _damaged_case(tmp_path_factory.mktemp("h"), base, _apply(base.data, [operation]))
    FIGURES["hypothesis, one damage, finished: " + check_case(case, base.events)] += 1


@FUZZ
@given(where=st.integers(0, 1 << 16), tail=st.binary(max_size=64))
def test_an_unfinished_trace_cut_anywhere_keeps_its_complete_batches(
        bases: dict[str, Base], tmp_path_factory: pytest.TempPathFactory, where: int,
        tail: bytes) -> None:
    base = bases["unfinished"]
    # Anywhere after the schema (the corpus covers cuts before it, which are errors).
    schema_end = message_ends(base.data)[0]
    cut = schema_end + ((len(base.data) - schema_end) * where >> 16)
    data = base.data[:cut] + tail  # a crash mid-write leaves any tail
    case = _damaged_case(tmp_path_factory.mktemp("h"), base, data)
    FIGURES["hypothesis, cut, unfinished: " + check_case(case, base.events)] += 1


@FUZZ
@given(name=st.sampled_from(["unfinished", "finished-zstd", "finished-none"]),
       operations=st.lists(OPERATION, min_size=1, max_size=5))
def test_any_damage_never_escapes_as_a_traceback(
        bases: dict[str, Base], tmp_path_factory: pytest.TempPathFactory, name: str,
        operations: list[tuple[str, int, bytes]]) -> None:
    # Several damages at once, or a flipped value bit in an unfinished trace (no digest):
    # the values read may be wrong (see docs/reliability.md), the structure never is.
    path = tmp_path_factory.mktemp("h") / "damaged.arrow"
    path.write_bytes(_apply(bases[name].data, operations))
    FIGURES["hypothesis, several damages: " + _survives(path)] += 1


@pytest.mark.parametrize("change", ["cut", "garbage", "removed"])
def test_a_file_damaged_after_it_was_opened_is_one_line_when_read(
        bases: dict[str, Base], tmp_path: Path, change: str) -> None:
    # Opening checked every batch; reading goes back to the file, which may have changed.
    path = tmp_path / "run.arrow"
    data = bases["finished-zstd"].data
    path.write_bytes(data)
    trace = open_trace(path)
    if change == "removed":
        path.unlink()
    else:
        path.write_bytes(data[:len(data) // 2] if change == "cut" else bytes(len(data)))
    for read in (lambda: trace.events().collect(), lambda: list(trace.iter_batches())):
        with pytest.raises(TraceFormatError) as caught:
            read()
        message = str(caught.value)
        assert message.startswith(f"{path}: record batch ") and "\n" not in message
        assert "the file changed after it was opened?" in message
