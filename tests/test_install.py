"""A plain, non-editable `pip install .` ships everything: package data, built-in analyzers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILTINS = {"busy_retry", "mapgpa", "seamcall_latency", "teardown_latency", "zap_scope",
            "zero_step"}


def test_non_editable_install_has_builtins_scenarios_and_templates(tmp_path: Path) -> None:
    # A fresh venv that sees the already-installed dependencies, so the test needs no network.
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "*.egg-info", "build", "reports", "__pycache__", ".pytest_cache", "*.arrow"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", "--no-build-isolation", "--no-cache-dir", str(source)],
                   check=True, env=env, cwd=tmp_path, capture_output=True)
    shutil.rmtree(source)  # nothing may be read from the source tree any more
    tdxtrace = env_dir / "bin" / "tdxtrace"
    work = tmp_path / "elsewhere"
    work.mkdir()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(tdxtrace), *args], env=env, cwd=work, capture_output=True,
                              text=True, check=False)

    listed = run("plugins", "--json")
    assert listed.returncode == 0, listed.stderr
    plugins = json.loads(listed.stdout)
    names = {a for p in plugins["plugins"] for a in p.get("analyzers", [])}
    assert names >= BUILTINS
    recorded = run("record", "zero-step", "--set", "run.duration_us=2000", "-o", "z.arrow")
    assert recorded.returncode == 0, recorded.stderr
    report = run("report", "z.arrow", "-o", "z.html")
    assert report.returncode == 0, report.stderr
    html = (work / "z.html").read_text()
    assert "BUSY retry chains by length" in html  # busy_retry's own template was found
