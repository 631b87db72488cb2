"""Every element id in a report names one element: in-page links (#a-zero_step-timeline) and
the charts' aria-labelledby must find the element they mean."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from tdxtrace.analysis import run_analyzers
from tdxtrace.plugins import load_analyzers, make_plugin_manager
from tdxtrace.report import render
from tdxtrace.sim.emulator import record
from tdxtrace.sim.scenario import load_scenario
from tdxtrace.trace import open_trace


def test_charts_and_the_tables_they_are_drawn_from_have_distinct_ids(tmp_path: Path) -> None:
    path = tmp_path / "demo.arrow"
    record(load_scenario("demo"), 1, path)
    trace = open_trace(path)
    analyzers = load_analyzers(make_plugin_manager()).analyzers
    rendered = render(trace, run_analyzers(trace, analyzers),
                      analyzers={a.name: a for a in analyzers})
    ids = Counter(re.findall(r'\sid="([^"]+)"', rendered.html))
    assert [i for i, n in ids.items() if n > 1] == []
    # All four charts are there, next to their tables.
    charts = re.findall(r'<figure class="chart-box" id="([^"]+)"', rendered.html)
    assert sorted(charts) == ["c-busy_retry-chain_length_hist", "c-seamcall_latency-by_leaf",
                              "c-teardown_latency-phases", "c-zero_step-timeline"]
    assert all(f'id="a-{c[2:]}"' in rendered.html for c in charts)
    for target in re.findall(r'aria-labelledby="([^"]+)"', rendered.html):
        assert all(ids[t] == 1 for t in target.split()), target
