"""A third-party analyzer's template can use what the README promises: the ``section``
variable (metrics by name with ``.text`` and ``.exact``, tables) and the built-in macros."""

from __future__ import annotations

import textwrap
from pathlib import Path

from cli_helpers import record_zero_step, run_cli

PLUGIN = '''
import polars as pl

from tdxtrace import hookimpl
from tdxtrace.analysis import Analyzer, AnalyzerResult


class Rows(Analyzer):
    name = "rows"
    description = "counts the observable rows"
    template = "templates/rows.html"

    def analyze(self, trace):
        n = trace.observable().select(pl.len()).collect().item()
        return AnalyzerResult(metrics={"rows": n},
                              tables={"parity": pl.DataFrame({"even": [n % 2 == 0]})})


@hookimpl
def register_analyzers():
    return [Rows()]
'''
TEMPLATE = '''
{% import "macros.html" as m %}
<p id="mine">text={{ section.metrics.rows.text }} exact={{ section.metrics.rows.exact }}</p>
{{ m.figure(section, "rows") }}{{ m.metrics(section) }}{{ m.notes(section) }}
{{ m.table(section.tables.get("parity"), "Parity") }}{{ m.tables(section, exclude=("parity",)) }}
'''


def test_the_documented_template_variables_and_macros_render(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    (plugins / "templates").mkdir(parents=True)
    (plugins / "rows.py").write_text(textwrap.dedent(PLUGIN))
    (plugins / "templates" / "rows.html").write_text(TEMPLATE)
    trace = record_zero_step(tmp_path)
    html = tmp_path / "r.html"
    result = run_cli("report", trace, "--plugins-dir", plugins, "-a", "rows", "-o", html)
    assert result.exit_code == 0, result.output
    page = html.read_text(encoding="utf-8")
    assert '<p id="mine">text=' in page and "Parity" in page
    assert "template failed" not in page.lower() and "undefined" not in page.lower()
