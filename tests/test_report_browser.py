"""End to end: open a written report in a real headless chromium and check what it renders.

Chromium is driven through its DevTools protocol over ``--remote-debugging-pipe`` (JSON messages
separated by NUL bytes on fds 3 and 4), so the test needs only the standard library. The page is
the report file itself, opened from ``file://``; the checks run through ``Runtime.evaluate``.

Needs /usr/bin/chromium (Debian: ``apt-get install chromium``). Without it the test is skipped,
except when the environment variable ``CI`` is set: then it fails, so CI cannot pass silently.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tdxtrace.report import write_report

CHROMIUM = Path("/usr/bin/chromium")
TIMEOUT_S = 60.0


def _chromium() -> str:
    found = str(CHROMIUM) if CHROMIUM.exists() else shutil.which("chromium")
    if found is None:
        message = ("chromium not found at /usr/bin/chromium "
                   "(install it: apt-get install -y chromium)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


class DevTools:
    """A minimal DevTools-protocol client over chromium's debugging pipe."""

    def __init__(self, binary: str, profile: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def child_fds() -> None:  # chromium reads commands on fd 3, writes answers on fd 4
            # Moved above 10 first, so placing one pipe end cannot overwrite the other.
            high_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
            high_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)  # dup2's copies are inheritable: they survive the exec
            os.dup2(high_w, 4)

        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--hide-scrollbars", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            # close_fds=False keeps fds 3 and 4; every other fd of ours is non-inheritable
            # (PEP 446), so the exec closes it anyway.
            preexec_fn=child_fds, close_fds=False,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("chromium did not answer in time")
            ready, _, _ = select.select([self._from_chrome], [], [], remaining)
            if ready:
                chunk = os.read(self._from_chrome, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the debugging pipe")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        message: dict[str, Any] = json.loads(raw)
        return message

    def send(self, method: str, params: dict[str, Any] | None = None,
             session: str | None = None) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method,
                                   "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            answer = self._read_message(deadline)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                result: dict[str, Any] = answer.get("result", {})
                return result
            self.events.append(answer)

    def wait_event(self, method: str) -> dict[str, Any]:
        for event in self.events:
            if event.get("method") == method:
                return event
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            message = self._read_message(deadline)
            self.events.append(message)
            if message.get("method") == method:
                return message

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError, TimeoutError):
            self.send("Browser.close")
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


# Runs in the page: what the checks need, measured by the browser's own layout.
_PROBE = """(() => {
  const box = (el) => { const r = el.getBoundingClientRect();
                        return {id: el.id, w: r.width, h: r.height}; };
  return {
    sections: [...document.querySelectorAll("main > section")].map(box),
    charts: [...document.querySelectorAll("svg.chart")].map((svg) => ({
      ...box(svg.closest("figure")), svgW: svg.getBoundingClientRect().width,
      svgH: svg.getBoundingClientRect().height, title: svg.querySelector("title").textContent,
      shapes: svg.querySelectorAll("rect, line").length })),
    scripts: document.scripts.length,
    alerted: window.__alerted === true,
    height: document.documentElement.scrollHeight,
  };
})()"""


def open_report(browser: DevTools, url: str, width: int = 1200) -> tuple[str, dict[str, Any]]:
    """Open ``url`` in a new tab; return the session and the probe's findings."""
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target,
                                                      "flatten": True})["sessionId"]
    for domain in ("Page", "Runtime", "Log", "Network"):
        browser.send(f"{domain}.enable", session=session)
    browser.send("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session)
    browser.send("Page.navigate", {"url": url}, session)
    browser.wait_event("Page.loadEventFired")
    probe = browser.send("Runtime.evaluate", {"expression": _PROBE, "returnByValue": True},
                         session)["result"]["value"]
    return session, probe


def screenshot(browser: DevTools, session: str, height: int, path: Path,
               width: int = 1200) -> None:
    shot = browser.send("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}}, session)
    path.write_bytes(base64.b64decode(shot["data"]))


def _problems(events: list[dict[str, Any]]) -> list[str]:
    """Console errors, uncaught exceptions and log errors (CSP violations are logged too)."""
    found = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            found.append(json.dumps(params.get("exceptionDetails", {}))[:300])
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            found.append(json.dumps(params.get("args", []))[:300])
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            found.append(params["entry"].get("text", "")[:300])
    return found


def _requested_urls(events: list[dict[str, Any]]) -> list[str]:
    return [e["params"]["request"]["url"] for e in events
            if e.get("method") == "Network.requestWillBeSent"]


@pytest.mark.browser
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    from test_report import sample_inputs  # the same hand-made trace and outcomes

    binary = _chromium()
    trace, outcomes, analyzers = sample_inputs(hostile=True)
    report = write_report(trace, outcomes, tmp_path / "report.html", analyzers=analyzers)
    browser = DevTools(binary, tmp_path / "profile")
    try:
        session, probe = open_report(browser, report.resolve().as_uri())
        screenshot(browser, session, probe["height"], tmp_path / "report.png")
    finally:
        browser.close()

    assert _problems(browser.events) == []
    assert _requested_urls(browser.events) == [report.resolve().as_uri()]
    assert probe["scripts"] == 0 and probe["alerted"] is False
    ids = [s["id"] for s in probe["sections"]]
    assert ids == ["summary", *(f"a-{o.name}" for o in sorted(outcomes, key=lambda o: o.name))]
    assert all(s["w"] > 0 and s["h"] > 0 for s in probe["sections"]), probe["sections"]
    titles = sorted(c["title"] for c in probe["charts"])
    assert titles == sorted([
        "BUSY retry chains by length", "SEAMCALL latency per leaf (log scale)",
        "Teardown phases (time from each TD's teardown start)",
        "Zero-step state per vCPU over the run"])
    for chart in probe["charts"]:
        assert chart["svgW"] > 100 and chart["svgH"] > 50, chart
        assert chart["shapes"] > 3, chart
    png = (tmp_path / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
