"""The HTML report: gold page, figures read back from the HTML, escaping, bounds, failures, CLI.

The gold file ``tests/gold/report.html`` is the whole page for :func:`sample_inputs` with the
tdxtrace version and the trace digest scrubbed. After an intended change to the report,
regenerate it and review the diff::

    TDXTRACE_UPDATE_GOLD=1 python3 -m pytest tests/test_report.py -k gold
"""

from __future__ import annotations

import os
import re
import textwrap
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from click.testing import CliRunner

from tdxtrace._version import __version__
from tdxtrace.analysis import Analyzer, AnalyzerOutcome, AnalyzerResult
from tdxtrace.cli import _Group
from tdxtrace.commands.report_cmd import report_command
from tdxtrace.errors import OutputError, TdxtraceError
from tdxtrace.events import Kind
from tdxtrace.report import build_report, render, render_report, write_html, write_report
from tdxtrace.report.thresholds import mark_for, parse_threshold
from tdxtrace.testing import make_trace
from tdxtrace.trace import RunMetadata, Trace, write_events

GOLD = Path(__file__).parent / "gold" / "report.html"
HOSTILE = "<script>alert(1)</script>\"'&</svg>"


class FakeAnalyzer(Analyzer):
    """Stands for a real analyzer: the report reads only its class attributes."""

    name = "fake"
    description = "fake"

    def analyze(self, trace: Trace) -> AnalyzerResult:
        raise AssertionError("the report never runs analyzers")


def fake(name: str, *, key: tuple[str, ...] = (), limits: dict[str, tuple[float, float]]
         | None = None, description: str = "") -> Analyzer:
    cls = type(name, (FakeAnalyzer,), {
        "name": name, "description": description or f"{name} (test double)",
        "key_metrics": key, "thresholds": limits or {}})
    analyzer: Analyzer = cls()
    return analyzer


def sample_inputs(*, hostile: bool = False) -> tuple[Trace, list[AnalyzerOutcome],
                                                     dict[str, Analyzer]]:
    """A hand-made trace and outcomes with all four charts, a warn mark and a failed analyzer."""
    h = HOSTILE if hostile else ""
    meta = RunMetadata(scenario_name=f"zero-step{h}", scenario_text='{"vcpus": 2, "seed": 7}',
                       seed=7, policies={"frozen_spte": f"resume_guest{h}",
                                         "hkid_release": "late"},
                       tdxtrace_version="9.9-test")
    rows: list[dict[str, Any]] = [
        {"kind": Kind.SEAMCALL, "ts_ns": 100 * i, "dur_ns": 50, "leaf": 6, "status": 0}
        for i in range(20)]
    rows.append({"kind": Kind.T_SYNTHESIZED_EXIT, "ts_ns": 2000, "truth": True})
    trace = make_trace(rows, meta)
    analyzers = {
        "busy_retry": fake("busy_retry", key=("busy_total", "max_chain"),
                           limits={"busy_total": (10, 100)},
                           description=f"OPERAND_BUSY retry chains{h}"),
        "seamcall_latency": fake("seamcall_latency", key=("seamcalls",)),
        "teardown_latency": fake("teardown_latency", key=("teardowns", "max_teardown_ns"),
                                 limits={"hkid_leaks": (1, 1)}),
        "zero_step": fake("zero_step", key=("incidents",), limits={"incidents": (1, 1)}),
        "mapgpa": fake("mapgpa", key=("conversions",)),
    }
    busy = AnalyzerResult(
        metrics={"busy_total": 56, "max_chain": 7, "mean_chain": 2.456789},
        tables={"chain_length_hist": pl.DataFrame({"length": [2, 3, 4, 7],
                                                   "chains": [40, 12, 3, 1]}),
                "chains": pl.DataFrame({"leaf": [f"TDH.MEM.PAGE.AUG{h}"] * 3,
                                        "gpa": [0x1000, 0x2000, 0x3000],
                                        "attempts": [2, 3, 7]})},
        notes=(f"BUSY on VP.ENTER is counted separately{h}",))
    phases = ["teardown", "private_pages", f"release_hkid{h}", "vp_flush", "cache_wb"]
    teardown = AnalyzerResult(
        metrics={"teardowns": 2, "max_teardown_ns": 20_000, "hkid_leaks": 0},
        tables={"phases": pl.DataFrame({
            "td": [0, 0, 0, 0, 0, 1, 1], "phase": [*phases, "teardown", "private_pages"],
            "start_ns": [0, 10, 5000, 5100, 9000, 100, 120],
            "dur_ns": [20_000, 4_900, 12_000, 2_000, 6_000, 15_000, 6_800]})})
    zero = AnalyzerResult(
        metrics={"incidents": 1, "max_run": 9},
        tables={"timeline": pl.DataFrame({
            "td": [0, 0, 0, 1], "vcpu": [0, 1, 1, 0],
            "start_ns": [1_000, 5_000, 20_000, 3_000], "end_ns": [4_000, 9_000, 26_000, 30_000],
            "state": [f"stepping{h}", f"stepping{h}", "armed", "armed"]})})
    latency = AnalyzerResult(
        metrics={"seamcalls": 1_243, "busy": 3},
        tables={"by_leaf": pl.DataFrame({
            "leaf": ["TDH.MEM.PAGE.AUG", f"TDH.MEM.SEPT.ADD{h}", "TDH.MEM.TRACK"],
            "count": [1_200, 40, 3], "min_ns": [800, 1_500, 300], "p50_ns": [1_200, 2_500, 400],
            "p99_ns": [9_000, 40_000, 900], "max_ns": [120_000, 90_000, 1_000]})})
    outcomes = [
        AnalyzerOutcome("zero_step", zero, None),
        AnalyzerOutcome("busy_retry", busy, None),
        AnalyzerOutcome("seamcall_latency", latency, None),
        AnalyzerOutcome("teardown_latency", teardown, None),
        AnalyzerOutcome("mapgpa", None, f"ValueError: R11 out of range{h}"),
    ]
    return trace, outcomes, analyzers


def scrub(html: str) -> str:
    html = html.replace(f"tdxtrace {__version__}", "tdxtrace VERSION")
    return re.sub(r"sha256:[0-9a-f]{64}", "sha256:DIGEST", html)


class PageParser(HTMLParser):
    """Text by element id path, summary rows, and every tag seen (to find injected ones)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.summary: dict[str, dict[str, str]] = {}
        self._row: dict[str, str] | None = None
        self._cell: list[str] | None = None
        self._in_summary = False
        self._in_body = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "table" and ("class", "summary-table") in attrs:
            self._in_summary = True
        elif self._in_summary and tag == "tbody":
            self._in_body = True
        elif self._in_body and tag == "tr":
            self._row = {}
        elif self._row is not None and tag == "li":
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_summary = self._in_body = False
        elif tag == "li" and self._row is not None and self._cell is not None:
            name, _, value = " ".join("".join(self._cell).split()).partition(" ")
            self._row[name] = value
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if "_name" in self._row:
                self.summary[self._row.pop("_name")] = self._row
            self._row = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)
        elif self._row is not None and data.strip():
            key = "_name" if "_name" not in self._row else "_mark"
            if key == "_mark" and "_mark" in self._row:
                return
            self._row[key] = data.strip()


def parse(html: str) -> PageParser:
    parser = PageParser()
    parser.feed(html)
    parser.close()
    return parser


def test_gold_page() -> None:
    """The whole page, byte for byte (TDXTRACE_UPDATE_GOLD=1 rewrites the gold file)."""
    trace, outcomes, analyzers = sample_inputs()
    page = scrub(render_report(trace, outcomes, analyzers=analyzers))
    if os.environ.get("TDXTRACE_UPDATE_GOLD") == "1":
        GOLD.parent.mkdir(exist_ok=True)
        GOLD.write_text(page, encoding="utf-8")
    assert page == GOLD.read_text(encoding="utf-8"), (
        "report changed; if intended: TDXTRACE_UPDATE_GOLD=1 pytest tests/test_report.py")


def test_key_figures_and_run_metadata_read_back_from_html() -> None:
    trace, outcomes, analyzers = sample_inputs()
    page = parse(render_report(trace, outcomes, analyzers=analyzers))
    summary = page.summary
    assert list(summary) == ["busy_retry", "mapgpa", "seamcall_latency", "teardown_latency",
                             "zero_step"]
    assert summary["busy_retry"]["_mark"] == "warn"  # 56 >= warn_at 10, < fail_at 100
    assert summary["busy_retry"]["busy_total"] == "56 warn"
    assert summary["busy_retry"]["max_chain"] == "7"
    assert summary["seamcall_latency"] == {"_mark": "ok", "seamcalls": "1,243"}
    assert summary["teardown_latency"]["max_teardown_ns"] == "20.0 µs"
    assert summary["teardown_latency"]["hkid_leaks"] == "0"  # thresholded, so shown
    assert summary["zero_step"]["_mark"] == "fail" and summary["zero_step"]["incidents"] == "1 fail"
    assert summary["mapgpa"]["_mark"] == "fail"
    text = " ".join(" ".join(page.text).split())
    assert "21 events (20 observable, 1 truth)" in text
    assert trace.summary is not None and trace.summary.digest in text
    assert "frozen_spte = resume_guest" in text and "hkid_release = late" in text
    assert "tdxtrace 9.9-test, schema v1" in text and f"tdxtrace {__version__}" in text
    assert "Seed 7" in text and "finished" in text


def test_hostile_strings_are_escaped_everywhere() -> None:
    trace, outcomes, analyzers = sample_inputs(hostile=True)
    html = render_report(trace, outcomes, analyzers=analyzers)
    assert "<script" not in html.lower()  # the report has no JS, so any script was injected
    assert html.count("<svg") == html.count("</svg>") == 4
    page = parse(html)
    assert all(tag != "script" for tag, _ in page.tags)
    allowed = {"id", "class", "href", "title", "lang", "charset", "name", "content",
               "http-equiv", "scope", "colspan", "role", "xmlns", "viewbox", "width",
               "height", "aria-labelledby", "x", "y", "x1", "x2", "y1", "y2", "fill",
               "text-anchor", "transform"}
    assert {a for _, attrs in page.tags for a in attrs} <= allowed
    text = "".join(page.text)
    # Shown as text wherever it came from: scenario, policy, description, note, table cell,
    # SVG label (phase, state, leaf) and error message.
    assert text.count(HOSTILE) >= 8
    assert f"ValueError: R11 out of range{HOSTILE}" in text


def test_same_inputs_same_bytes_whatever_the_order() -> None:
    trace, outcomes, analyzers = sample_inputs()
    first = render_report(trace, outcomes, analyzers=analyzers)
    shuffled = dict(reversed(list(analyzers.items())))
    assert render_report(trace, outcomes[::-1], analyzers=shuffled) == first
    assert render_report(*sample_inputs()[:2], analyzers=sample_inputs()[2]) == first


def test_size_is_bounded_for_huge_results() -> None:
    n = 400_000
    trace = make_trace([{"kind": Kind.SEAMCALL, "ts_ns": 0}])
    wide = pl.DataFrame({f"col{i}": pl.int_range(n, eager=True) for i in range(30)})
    timeline = pl.DataFrame({
        "td": pl.int_range(n, eager=True) % 3, "vcpu": pl.int_range(n, eager=True) % 100,
        "start_ns": pl.int_range(n, eager=True) * 1_000,
        "end_ns": pl.int_range(n, eager=True) * 1_000 + 700,
        "state": (pl.int_range(n, eager=True) % 13).cast(pl.String)})
    by_leaf = pl.DataFrame({"leaf": pl.int_range(2000, eager=True), "count": 1,
                            "min_ns": 10, "p50_ns": 100, "p99_ns": 1000, "max_ns": 10_000})
    result = AnalyzerResult(
        metrics={f"m{i}": i for i in range(5000)},
        tables={**{f"t{i}": wide for i in range(40)},
                "timeline": timeline, "by_leaf": by_leaf,
                "chain_length_hist": pl.DataFrame({"length": pl.int_range(n, eager=True),
                                                   "chains": 1}),
                "phases": pl.DataFrame({"td": pl.int_range(n, eager=True) % 50,
                                        "phase": "x" * 500, "start_ns": 0, "dur_ns": 5})},
        notes=tuple("n" * 10_000 for _ in range(1000)))
    outcomes = [AnalyzerOutcome(name, result, None) for name in
                ("zero_step", "seamcall_latency", "busy_retry", "teardown_latency")]
    html = render_report(trace, outcomes, analyzers={})
    assert len(html.encode()) < 2_000_000
    assert html.count("<svg") == 4
    assert "399,950 more rows not shown" in html or "more rows not shown" in html
    assert "more tables not shown" in html and "more metrics not shown" in html


def test_unfinished_trace_is_flagged_in_the_header(tmp_path: Path) -> None:
    from tdxtrace.trace import TraceWriter, open_trace
    from tdxtrace.trace.writer import conform_events

    path = tmp_path / "cut.arrow"
    writer = TraceWriter(path, RunMetadata(scenario_name="cut"))
    frame = pl.DataFrame({"kind": [int(Kind.SEAMCALL)] * 2, "ts_ns": [0, 5]})
    writer.write_batch(conform_events(frame).to_batches()[0])
    writer.close_unfinished()
    trace = open_trace(path)
    text = " ".join(" ".join(parse(render_report(trace, [], analyzers={})).text).split())
    assert "Unfinished trace:" in text and "Digest none (unfinished trace)" in text
    assert "Trace cut.arrow" in text and "No analyzer ran." in text
    assert all(w in text for w in trace.warnings)


def test_output_does_not_depend_on_hash_seed() -> None:
    """Two interpreters with different string-hash seeds write the same bytes."""
    import subprocess
    import sys

    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_report as t; "
            "from tdxtrace.report import render_report; "
            "tr, o, a = t.sample_inputs(hostile=True); "
            "sys.stdout.write(render_report(tr, o, analyzers=a))")
    pages = [subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)],
                            env={**os.environ, "PYTHONHASHSEED": seed}, check=True,
                            capture_output=True, text=True, encoding="utf-8").stdout
             for seed in ("1", "2")]
    trace, outcomes, analyzers = sample_inputs(hostile=True)
    assert pages[0] == pages[1] == render_report(trace, outcomes, analyzers=analyzers)


def test_failed_analyzer_gets_a_section_with_its_error() -> None:
    trace, outcomes, analyzers = sample_inputs()
    rendered = render(trace, outcomes, analyzers=analyzers)
    assert rendered.failed == ("mapgpa",)
    section = rendered.html.split('<section id="a-mapgpa"', 1)[1].split("</section>", 1)[0]
    assert "Failed." in section and "ValueError: R11 out of range" in section
    assert 'class="mark mark-fail"' in section


def test_empty_tables_give_no_data_notes_instead_of_charts() -> None:
    trace = make_trace([{"kind": Kind.SEAMCALL, "ts_ns": 0}])
    empty = AnalyzerResult({"busy_total": 0}, {"chain_length_hist": pl.DataFrame(
        schema={"length": pl.Int64, "chains": pl.UInt32})})
    html = render_report(trace, [AnalyzerOutcome("busy_retry", empty, None)], analyzers={})
    assert "<svg" not in html
    assert "No BUSY retry chains." in html and "No rows." in html


def test_threshold_rule_and_overrides() -> None:
    assert [mark_for(v, (10, 100)) for v in (9.99, 10, 99, 100)] == ["ok", "warn", "warn",
                                                                      "fail"]
    assert mark_for(5, None) == ""
    assert parse_threshold("busy_retry.busy_total=10:1e3") == ("busy_retry", "busy_total",
                                                                (10.0, 1000.0))
    for bad in ("busy_total=1:2", "a.b=1", "a.b=x:2", "a.b=5:1", "a.b=1:inf"):
        with pytest.raises(TdxtraceError, match="--threshold"):
            parse_threshold(bad)
    trace, outcomes, analyzers = sample_inputs()
    model = build_report(trace, outcomes, analyzers=analyzers,
                         thresholds={"busy_retry": {"busy_total": (100, 200)},
                                     "seamcall_latency": {"busy": (1, 3)}})
    marks = {s.name: s.mark for s in model.sections}
    assert marks["busy_retry"] == "ok" and marks["seamcall_latency"] == "fail"


PLUGIN_SOURCE = '''
from tdxtrace.analysis import Analyzer, AnalyzerResult

class Custom(Analyzer):
    name = "custom"
    description = "has its own template"
    template = "templates/custom.html"
    key_metrics = ("hits",)

    def analyze(self, trace):
        return AnalyzerResult({"hits": 3}, {"rows": __import__("polars").DataFrame({"a": [1]})})
'''


def _plugin_module(tmp_path: Path, template: str) -> Analyzer:
    import importlib.util

    (tmp_path / "templates").mkdir(exist_ok=True)
    (tmp_path / "templates" / "custom.html").write_text(template, encoding="utf-8")
    module_file = tmp_path / "custom_plugin.py"
    module_file.write_text(PLUGIN_SOURCE, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(f"custom_plugin_{tmp_path.name}", module_file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    import sys

    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    analyzer: Analyzer = module.Custom()
    return analyzer


@pytest.mark.parametrize("template, failure", [
    ('{% import "macros.html" as m %}<p class="custom">hits: {{ m.figure(section, "hits") }}'
     '</p>{{ m.tables(section) }}', None),
    ("<p>{{ section.no_such_thing }}</p>", "UndefinedError"),
    ("<p>{% if %}</p>", "TemplateSyntaxError"),
])
def test_analyzer_template_is_used_or_its_failure_shown(tmp_path: Path, template: str,
                                                        failure: str | None) -> None:
    analyzer = _plugin_module(tmp_path, template)
    trace = make_trace([{"kind": Kind.SEAMCALL, "ts_ns": 0}])
    outcome = AnalyzerOutcome("custom", analyzer.analyze(trace), None, analyzer)
    rendered = render(trace, [outcome])
    if failure is None:
        assert rendered.failed == ()
        assert '<p class="custom">hits: <span class="value" title="3">3</span></p>' in rendered.html
        assert 'class="error-box"' not in rendered.html
    else:
        assert rendered.failed == ("custom",)
        assert "template templates/custom.html" in rendered.html and failure in rendered.html
        assert str(tmp_path) not in rendered.html  # errors name the template as declared
        assert "hits" in rendered.html  # the generic layout still shows the results


BUILT_IN = ("busy_retry", "mapgpa", "seamcall_latency", "teardown_latency", "zap_scope",
            "zero_step")


@pytest.mark.parametrize("name", BUILT_IN)
def test_builtin_analyzer_templates_render_real_results(name: str) -> None:
    """Each shipped template renders the built-in analyzer's own result (on an empty trace:
    every metric 0, every table empty) without a template error."""
    import importlib.resources
    from dataclasses import replace

    from tdxtrace.analysis import run_analyzers
    from tdxtrace.plugins import load_analyzers, make_plugin_manager
    from tdxtrace.report.model import build_report as build_model
    from tdxtrace.report.render import render_section

    template = importlib.resources.files("tdxtrace_plugins") / "templates" / f"{name}.html"
    loaded = load_analyzers(make_plugin_manager(env={"TDXTRACE_LOAD_PLUGINS": name}))
    assert loaded.failed == ()
    trace = make_trace([])
    outcomes = run_analyzers(trace, loaded.analyzers, only=[name])
    assert outcomes[0].error is None
    model = build_model(trace, outcomes, analyzers={a.name: a for a in loaded.analyzers})
    section = replace(model.sections[0], template=Path(str(template)),
                      template_name=f"templates/{name}.html")
    rendered, body = render_section(section)
    assert rendered.template_error is None
    assert '<p class="lead">' in body and "—" not in body.split("</p>", 1)[0]
    for table in section.tables.values():
        assert f'id="{table.anchor}"' in body  # every table is shown somewhere


def test_write_report_refuses_existing_output_and_leaves_no_temp_file(tmp_path: Path) -> None:
    trace, outcomes, analyzers = sample_inputs()
    out = tmp_path / "sub" / "r.html"
    assert write_report(trace, outcomes, out, analyzers=analyzers) == out
    first = out.read_text(encoding="utf-8")
    with pytest.raises(OutputError, match=re.escape(str(out))):
        write_report(trace, outcomes, out, analyzers=analyzers)
    write_html("<p>x</p>", out, force=True)
    assert out.read_text(encoding="utf-8") == "<p>x</p>" != first
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.html"]


CLI_PLUGIN = '''
from tdxtrace import hookimpl
from tdxtrace.analysis import Analyzer, AnalyzerResult


class Counter(Analyzer):
    name = "counter"
    description = "counts observable events"
    key_metrics = ("events",)
    thresholds = {"events": (1000, 2000)}

    def analyze(self, trace):
        return AnalyzerResult({"events": trace.observable().collect().height})


class Broken(Analyzer):
    name = "broken"
    description = "always fails"

    def analyze(self, trace):
        raise RuntimeError("broken on purpose")


@hookimpl
def register_analyzers():
    return [Counter(), Broken()]
'''


def run_cli(args: list[str]) -> Any:
    """``tdxtrace report ARGS`` through the CLI's group, which turns errors into exit codes."""
    group = _Group("tdxtrace", commands={"report": report_command})
    return CliRunner().invoke(group, ["report", *args])


@pytest.fixture
def cli_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "cliplug.py").write_text(textwrap.dedent(CLI_PLUGIN), encoding="utf-8")
    trace_path = tmp_path / "run.arrow"
    frame = pl.DataFrame({"kind": [int(Kind.SEAMCALL)] * 3, "ts_ns": [0, 10, 20]})
    write_events(trace_path, frame, RunMetadata(scenario_name="cli", seed=1))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TDXTRACE_LOAD_PLUGINS", "cliplug")
    return trace_path, plugins


def test_cli_writes_default_path_and_exits_1_on_failed_analyzer(
        cli_setup: tuple[Path, Path]) -> None:
    trace_path, plugins = cli_setup
    args = [str(trace_path), "--plugins-dir", str(plugins)]
    result = run_cli(args)
    assert result.exit_code == 1, result.output
    assert "analyzer broken failed: RuntimeError: broken on purpose" in result.stderr
    report = Path("reports/run.html")
    assert result.stdout.strip() == str(report) and report.is_file()
    page = parse(report.read_text(encoding="utf-8"))
    assert page.summary["counter"] == {"_mark": "ok", "events": "3"}
    assert page.summary["broken"]["_mark"] == "fail"

    again = run_cli(args)
    assert again.exit_code == 2 and "reports/run.html: already exists" in again.stderr
    ok = run_cli([*args, "-a", "counter", "--force",
                                        "--threshold", "counter.events=2:3"])
    assert ok.exit_code == 0, ok.output
    assert parse(report.read_text(encoding="utf-8")).summary == {
        "counter": {"_mark": "fail", "events": "3 fail"}}


@pytest.mark.parametrize("extra, message", [
    (["--threshold", "counter.nope=1:2"], "counter reports no metric 'nope'"),
    (["--threshold", "ghost.events=1:2"], "no analyzer 'ghost' ran"),
    (["--threshold", "counter.events"], "expected ANALYZER.METRIC=WARN:FAIL"),
    (["-a", "ghost"], "unknown analyzer 'ghost'"),
])
def test_cli_bad_input_exits_2_with_one_line(cli_setup: tuple[Path, Path], extra: list[str],
                                             message: str) -> None:
    trace_path, plugins = cli_setup
    result = run_cli([str(trace_path), "--plugins-dir", str(plugins), *extra])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert not Path("reports/run.html").exists()


def test_cli_unreadable_trace_is_bad_input(cli_setup: tuple[Path, Path]) -> None:
    _, plugins = cli_setup
    Path("junk.arrow").write_bytes(b"not arrow")
    result = run_cli(["junk.arrow", "--plugins-dir", str(plugins)])
    assert result.exit_code == 2 and "junk.arrow" in result.stderr
    assert result.stderr.count("\n") == 1


def test_cli_plugin_that_fails_to_import_gets_a_failed_section(
        cli_setup: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    trace_path, plugins = cli_setup
    (plugins / "badplug.py").write_text("raise ImportError('no such thing')\n", encoding="utf-8")
    monkeypatch.setenv("TDXTRACE_LOAD_PLUGINS", "cliplug,badplug")
    result = run_cli([str(trace_path), "--plugins-dir", str(plugins), "-a", "counter"])
    assert result.exit_code == 1
    assert "plugin badplug failed" in result.stderr and "no such thing" in result.stderr
    page = parse(Path("reports/run.html").read_text(encoding="utf-8"))
    assert page.summary["plugin badplug"]["_mark"] == "fail"
    assert page.summary["counter"] == {"_mark": "ok", "events": "3"}
