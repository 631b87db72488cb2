"""Deterministic replay: run a trace's scenario again and prove the events identical.

* :func:`plan_from_metadata` rebuilds the run (scenario, seed) from a trace's metadata and
  refuses traces from another tdxtrace version unless forced;
* :func:`replay_trace` re-runs the emulator and compares batch by batch as it goes
  (:mod:`.compare`), stopping at the first divergent event;
* :func:`snapshot` reads the model's state where a replay stopped (``--until``);
* :func:`check_streaming` checks each analyzer's per-batch form against its batch form;
* capsules (:mod:`.capsule`) let a run be replayed and checked without its trace.
"""

from __future__ import annotations

from tdxtrace.replay.analyze import AnalysisCheck, check_streaming
from tdxtrace.replay.capsule import (
    Capsule,
    capsule_from_trace,
    plan_from_capsule,
    read_capsule,
    replay_capsule,
    write_capsule,
)
from tdxtrace.replay.compare import Divergence, StreamComparator, first_difference
from tdxtrace.replay.runner import (
    ReplayPlan,
    ReplayResult,
    VersionMismatch,
    plan_from_metadata,
    replay_trace,
)
from tdxtrace.replay.state import snapshot

__all__ = [
    "AnalysisCheck",
    "Capsule",
    "Divergence",
    "ReplayPlan",
    "ReplayResult",
    "StreamComparator",
    "VersionMismatch",
    "capsule_from_trace",
    "check_streaming",
    "first_difference",
    "plan_from_capsule",
    "plan_from_metadata",
    "read_capsule",
    "replay_capsule",
    "replay_trace",
    "snapshot",
    "write_capsule",
]
