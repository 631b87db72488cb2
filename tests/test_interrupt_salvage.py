"""An interrupted ``record`` keeps every event emitted before the interrupt, not only its full
batches of 64 Ki events: the rows still buffered are written as a last, short batch.

The interrupt is injected at an exact event count (tests/test_interrupt.py sends real
signals, which land anywhere), so the kept trace can be compared with an uninterrupted run of
the same scenario and seed, row for row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from tdxtrace.sim.emulator import RecordInterrupted, record
from tdxtrace.sim.recorder import BATCH_ROWS, EventLog
from tdxtrace.sim.scenario import load_scenario
from tdxtrace.trace import open_trace


def _interrupt_at(events: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C just before the event numbered ``events`` is emitted."""
    for method in ("emit", "row"):  # the hot paths call row(), the rest emit()
        real = getattr(EventLog, method)

        def checked(self: EventLog, *args: Any, real: Any = real, **kwargs: Any) -> None:
            if self.events == events:
                raise KeyboardInterrupt
            real(self, *args, **kwargs)

        monkeypatch.setattr(EventLog, method, checked)


@pytest.mark.parametrize("cut", [BATCH_ROWS + 4_465, 977])
def test_the_kept_trace_is_the_uninterrupted_runs_first_events(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: int) -> None:
    scenario = load_scenario("fault-storm")
    whole = tmp_path / "whole.arrow"
    record(scenario, 1, whole)
    _interrupt_at(cut, monkeypatch)
    kept = tmp_path / "kept.arrow"
    with pytest.raises(RecordInterrupted) as interrupted:
        record(scenario, 1, kept)
    assert interrupted.value.kept  # even before the first full batch
    trace = open_trace(kept)
    assert not trace.finished and trace.num_events() == cut
    assert_frame_equal(pl.read_ipc(kept), pl.read_ipc(whole).head(cut))
