"""The plugin example in the README works as printed."""

from __future__ import annotations

import json
import re
from pathlib import Path

from click.testing import CliRunner

from tdxtrace.cli import main
from tdxtrace.sim.emulator import record
from tdxtrace.sim.scenario import load_scenario

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_plugin_runs_beside_the_builtins(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    example = next(b for b in blocks if b.startswith("# my_plugins/vp_enter_busy.py"))
    plugins = tmp_path / "my_plugins"
    plugins.mkdir()
    (plugins / "vp_enter_busy.py").write_text(example)
    trace = tmp_path / "run.arrow"
    summary = record(load_scenario("zero-step", ["run.duration_us=5000"]), 1, trace)
    result = CliRunner().invoke(main, ["analyze", str(trace), "--plugins-dir", str(plugins),
                                       "--format", "json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    vp_enter_busy = sum(n for key, n in summary.truth["busy_by_leaf_operand"].items()
                        if key.startswith("TDH.VP.ENTER|"))
    assert doc["vp_enter_busy"]["metrics"]["busy"] == vp_enter_busy > 0
    assert "zero_step" in doc  # the built-ins still run
