"""The plugin system: loading, isolation of failures, hook checks, and running analyzers."""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
import math
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
from polars.testing import assert_frame_equal

import tdxtrace
from tdxtrace import hookspecs
from tdxtrace.analysis import Analyzer, AnalyzerResult, run_analyzers
from tdxtrace.errors import TdxtraceError
from tdxtrace.events import Kind
from tdxtrace.plugins import describe_plugins, load_analyzers, make_plugin_manager
from tdxtrace.testing import make_trace
from tdxtrace.trace import Trace

ROOT = Path(__file__).resolve().parent.parent
NONE: dict[str, str] = {}  # an environment without TDXTRACE_LOAD_PLUGINS

ANALYZER_PLUGIN = '''
from tdxtrace import hookimpl
from tdxtrace.analysis import Analyzer, AnalyzerResult

class {cls}(Analyzer):
    name = "{name}"
    description = "test analyzer {name}"
    def analyze(self, trace):
        {body}

@hookimpl
def register_analyzers():
    return [{cls}()]
'''


def plugin(folder: Path, file: str, name: str, body: str = "return AnalyzerResult({'n': 1})",
           *, source: str | None = None) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / f"{file}.py"
    path.write_text(source if source is not None else ANALYZER_PLUGIN.format(
        cls=name.title().replace("_", ""), name=name, body=body))
    return path


def dir_manager(*dirs: Path, env: dict[str, str] = NONE) -> Any:
    return make_plugin_manager(plugins_dirs=dirs, load_entry_points=False, env=env)


class Fixed(Analyzer):
    description: ClassVar[str] = "returns what it was given"

    def __init__(self, name: str, result: Any) -> None:
        self.name = name  # type: ignore[misc]
        self.result = result

    def analyze(self, trace: Trace) -> AnalyzerResult:
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result  # type: ignore[no-any-return]


# --- loading ----------------------------------------------------------------------------------
def test_a_plugins_dir_file_is_loaded_with_its_origin_hooks_and_analyzers(tmp_path: Path) -> None:
    path = plugin(tmp_path, "mine", "my_counts")
    pm = dir_manager(tmp_path)
    [info] = describe_plugins(pm)
    assert (info.name, info.version, info.source, info.where) == (
        "mine", "-", "plugins dir", str(path))
    assert (info.hooks, info.analyzers) == (("register_analyzers",), ("my_counts",))


def test_nothing_is_registered_at_import_time(tmp_path: Path) -> None:
    plugin(tmp_path, "mine", "my_counts")
    assert dir_manager().get_plugins() == set()
    first, second = dir_manager(tmp_path), dir_manager(tmp_path)
    assert first.get_plugin("mine") is not second.get_plugin("mine")  # each manager imports anew


def test_the_built_in_analyzers_come_from_entry_points() -> None:
    group = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="tdxtrace")}
    assert group["busy_retry"] == "tdxtrace_plugins.busy_retry"
    pm = make_plugin_manager(env={"TDXTRACE_LOAD_PLUGINS": "busy_retry,seamcall_latency"})
    infos = {i.name: i for i in describe_plugins(pm)}
    assert sorted(infos) == ["busy_retry", "seamcall_latency"]
    assert infos["busy_retry"].source == "entry point"
    assert infos["busy_retry"].version == tdxtrace.__version__
    version = tdxtrace.__version__
    assert infos["busy_retry"].where == f"tdxtrace_plugins.busy_retry (tdxtrace {version})"
    assert infos["seamcall_latency"].analyzers == ("seamcall_latency",)


def test_an_entry_point_that_fails_to_import_is_a_failed_plugin(
        monkeypatch: pytest.MonkeyPatch) -> None:
    ghost = importlib.metadata.EntryPoint("ghost", "tdxtrace_no_such_module", "tdxtrace")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [ghost])
    pm = make_plugin_manager(env=NONE)
    assert pm.get_plugins() == set()
    [failed] = pm.failed
    assert (failed.name, failed.where) == ("ghost", "tdxtrace_no_such_module (unknown "
                                                    "distribution -)")
    assert failed.error == "ModuleNotFoundError: No module named 'tdxtrace_no_such_module'"


def test_a_plugin_file_with_a_syntax_error_fails_alone(tmp_path: Path) -> None:
    plugin(tmp_path, "a_broken", "x", source="def register_analyzers(:\n")
    plugin(tmp_path, "b_fine", "fine")
    loaded = load_analyzers(dir_manager(tmp_path))
    assert [a.name for a in loaded.analyzers] == ["fine"]
    [failed] = loaded.failed
    assert (failed.name, failed.where) == ("a_broken", str(tmp_path / "a_broken.py"))
    assert failed.error.startswith("SyntaxError: ")
    assert "\n" not in failed.error


def test_files_starting_with_underscore_are_helpers_not_plugins(tmp_path: Path) -> None:
    plugin(tmp_path, "_helper", "x", source="raise RuntimeError('must not be imported')\n")
    assert dir_manager(tmp_path).failed == []


def test_a_misspelled_hook_is_an_error_naming_plugin_and_hook(tmp_path: Path) -> None:
    plugin(tmp_path, "typo", "x", source=(
        "from tdxtrace import hookimpl\n@hookimpl\ndef register_analyser():\n    return []\n"))
    with pytest.raises(TdxtraceError) as err:
        dir_manager(tmp_path)
    assert str(err.value) == (f"plugin 'typo' ({tmp_path / 'typo.py'}) implements unknown hook "
                              "'register_analyser'; known hooks: register_analyzers")


def test_a_hook_with_arguments_the_spec_lacks_is_an_error(tmp_path: Path) -> None:
    plugin(tmp_path, "args", "x", source=(
        "from tdxtrace import hookimpl\n@hookimpl\ndef register_analyzers(trace):\n"
        "    return []\n"))
    with pytest.raises(TdxtraceError, match=r"^plugin 'args' \(.*args\.py\): .*trace"):
        dir_manager(tmp_path)


def test_a_missing_plugins_dir_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(TdxtraceError, match=r"^--plugins-dir .*nowhere: not a folder$"):
        dir_manager(tmp_path / "nowhere")


def test_two_plugins_of_one_name_the_second_fails(tmp_path: Path) -> None:
    plugin(tmp_path / "one", "same", "first")
    plugin(tmp_path / "two", "same", "second")
    loaded = load_analyzers(dir_manager(tmp_path / "one", tmp_path / "two"))
    assert [a.name for a in loaded.analyzers] == ["first"]
    assert loaded.failed[0].error == (
        f"name already used by the plugin from {tmp_path / 'one' / 'same.py'}")


def test_tdxtrace_load_plugins_limits_what_loads(tmp_path: Path) -> None:
    for name in ("alpha", "beta", "gamma"):
        plugin(tmp_path, name, name)
    assert sorted(dir_manager(tmp_path, env={"TDXTRACE_LOAD_PLUGINS": " gamma,alpha "}).origins
                  ) == ["alpha", "gamma"]
    for empty in ("", " , "):  # set but empty means unset: everything loads
        assert sorted(dir_manager(tmp_path, env={"TDXTRACE_LOAD_PLUGINS": empty}).origins
                      ) == ["alpha", "beta", "gamma"]
    with pytest.raises(TdxtraceError, match="TDXTRACE_LOAD_PLUGINS names unknown plugin"
                                            r"\(s\) delta; available: alpha, beta, gamma"):
        dir_manager(tmp_path, env={"TDXTRACE_LOAD_PLUGINS": "alpha,delta"})


def test_a_disallowed_broken_plugin_is_not_even_imported(tmp_path: Path) -> None:
    plugin(tmp_path, "broken", "x", source="raise RuntimeError('boom')\n")
    plugin(tmp_path, "fine", "fine")
    assert dir_manager(tmp_path, env={"TDXTRACE_LOAD_PLUGINS": "fine"}).failed == []


@pytest.mark.parametrize(("source", "error"), [
    ("raise ValueError('no analyzers today')", "ValueError: no analyzers today"),
    ("return {'a': 1}", "TypeError: register_analyzers returned dict, expected a list"),
    ("return [object()]", "TypeError: register_analyzers returned object, expected "
                          "tdxtrace.analysis.Analyzer instances"),
])
def test_a_register_analyzers_hook_that_misbehaves_fails_its_plugin_only(
        tmp_path: Path, source: str, error: str) -> None:
    plugin(tmp_path, "bad", "x", source=(
        f"from tdxtrace import hookimpl\n@hookimpl\ndef register_analyzers():\n    {source}\n"))
    plugin(tmp_path, "good", "good")
    pm = dir_manager(tmp_path)
    loaded = load_analyzers(pm)
    assert [a.name for a in loaded.analyzers] == ["good"]
    assert [(f.name, f.error) for f in loaded.failed] == [("bad", error)]
    assert [i.name for i in describe_plugins(pm, loaded)] == ["good"]


def test_duplicate_analyzer_names_name_both_plugins(tmp_path: Path) -> None:
    plugin(tmp_path, "first", "shared")
    plugin(tmp_path, "second", "shared")
    with pytest.raises(TdxtraceError, match=r"^analyzer name 'shared' is registered by both "
                                            r"plugin 'first' and plugin 'second'$"):
        load_analyzers(dir_manager(tmp_path))


def test_analyzers_are_sorted_by_name_not_by_load_order(tmp_path: Path) -> None:
    plugin(tmp_path, "a_loaded_first", "zeta")
    plugin(tmp_path, "b_loaded_second", "alpha")
    loaded = load_analyzers(dir_manager(tmp_path))
    assert [a.name for a in loaded.analyzers] == ["alpha", "zeta"]
    outcomes = run_analyzers(make_trace([]), reversed(loaded.analyzers))
    assert [o.name for o in outcomes] == ["alpha", "zeta"]
    assert loaded.plugin_of == {"alpha": "b_loaded_second", "zeta": "a_loaded_first"}


# --- running analyzers ------------------------------------------------------------------------
def test_a_failing_analyzer_is_reported_and_the_others_still_run() -> None:
    good = AnalyzerResult({"n": 1})
    outcomes = run_analyzers(make_trace([]), [
        Fixed("c_nan", AnalyzerResult({"x": math.nan})),
        Fixed("b_raises", ZeroDivisionError("division by zero")),
        Fixed("a_ok", good),
        Fixed("d_wrong", [1, 2]),
        Fixed("e_table", AnalyzerResult({}, {"t": [1]})),  # type: ignore[dict-item]
    ])
    assert [(o.name, o.ok, o.error) for o in outcomes] == [
        ("a_ok", True, None),
        ("b_raises", False, "ZeroDivisionError: division by zero"),
        ("c_nan", False, "ValueError: c_nan: metric 'x' is nan (JSON numbers only)"),
        ("d_wrong", False, "TypeError: d_wrong.analyze() returned list, expected AnalyzerResult"),
        ("e_table", False, "TypeError: e_table: table 't' is list, expected polars.DataFrame"),
    ]
    assert outcomes[0].result is good


def test_only_selects_analyzers_and_an_unknown_name_lists_the_available_ones() -> None:
    analyzers = [Fixed("a", AnalyzerResult({})), Fixed("b", AnalyzerResult({}))]
    assert [o.name for o in run_analyzers(make_trace([]), analyzers, only=["b"])] == ["b"]
    with pytest.raises(TdxtraceError, match=r"^unknown analyzer 'c'; available: a, b$"):
        run_analyzers(make_trace([]), analyzers, only=["c", "a"])
    with pytest.raises(TdxtraceError, match="two analyzers are named 'a'"):
        run_analyzers(make_trace([]), [*analyzers, Fixed("a", AnalyzerResult({}))])


def test_the_per_batch_form_gives_the_same_result_as_analyze() -> None:
    from tdxtrace_plugins.seamcall_latency import SeamcallLatency

    rows = [{"kind": Kind.SEAMCALL, "ts_ns": i, "dur_ns": 10 + i % 7, "leaf": i % 3,
             "status": 0} for i in range(50)]
    rows.insert(20, {"kind": Kind.SEAMCALL, "ts_ns": 19, "dur_ns": 10**6, "leaf": 1,
                     "truth": True})  # truth rows never reach the analyzer
    frame = make_trace(rows).events().collect()
    analyzer = SeamcallLatency()
    state = analyzer.start(make_trace([]).metadata)
    for batch in frame.iter_slices(17):
        analyzer.feed(state, batch)
    streamed = analyzer.finish(state)
    whole = analyzer.analyze(Trace.from_frame(frame))
    assert streamed.metrics == whole.metrics
    assert streamed.metrics["seamcalls"] == 50
    assert_frame_equal(streamed.tables["by_leaf"], whole.tables["by_leaf"])


# --- the public API ---------------------------------------------------------------------------
def test_every_hook_spec_is_typed_and_documented() -> None:
    pm = make_plugin_manager(load_entry_points=False, env=NONE)
    names = [n for n in dir(hookspecs) if pm.parse_hookspec_opts(hookspecs, n) is not None]
    assert names == ["register_analyzers"]
    for name in names:
        spec = getattr(hookspecs, name)
        assert "Contract:" in (spec.__doc__ or ""), name
        assert inspect.signature(spec).return_annotation != inspect.Signature.empty, name


ALLOWED = {"tdxtrace", "tdxtrace.analysis", "tdxtrace.trace", "tdxtrace.codes",
           "tdxtrace.events", "tdxtrace.schema", "polars", "pyarrow"}


def test_built_in_plugins_use_only_the_public_api() -> None:
    files = sorted((ROOT / "plugins").glob("*.py"))
    assert {"busy_retry.py", "seamcall_latency.py"} <= {f.name for f in files}
    for file in files:
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.ImportFrom) and node.level:
                # Relative imports reach sibling helper modules, which this test checks too.
                assert (node.module or "").startswith("_"), f"{file.name}: {node.module}"
                continue
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                allowed = module in ALLOWED or (top in ALLOWED and top != "tdxtrace")
                assert allowed or top in sys.stdlib_module_names, f"{file.name}: {module}"
