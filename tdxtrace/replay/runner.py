"""Rebuild a run from a trace's metadata, run the emulator again and compare as it goes.

Everything replay needs is in the trace: the canonical scenario text, the seed and the version
of tdxtrace that wrote it. Nothing here knows about particular scenarios: a whole run goes
through :func:`tdxtrace.sim.emulator.run_scenario`; a run that must stop at one event (an
unfinished trace's last event, or ``--until``) uses :class:`World` with its ``make_log`` hook.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import polars as pl

from tdxtrace._version import __version__
from tdxtrace.errors import TdxtraceError
from tdxtrace.replay.compare import Divergence, ReplayStopped, StreamComparator
from tdxtrace.schema import META_POLICIES, META_PRODUCER, META_SCENARIO, META_SCENARIO_NAME
from tdxtrace.sim.emulator import Progress, run_scenario
from tdxtrace.sim.recorder import BatchSink, EventLog
from tdxtrace.sim.scenario import Scenario, from_canonical
from tdxtrace.sim.world import World
from tdxtrace.trace import RunMetadata, Trace
from tdxtrace.trace.metadata import canonical_json


class VersionMismatch(TdxtraceError):
    """The trace (or capsule) was written by another tdxtrace version and --force is absent."""


@dataclass(frozen=True)
class ReplayPlan:
    """What to run: the scenario and seed, and a note when the versions differ."""

    scenario: Scenario
    seed: int
    version_note: str | None  # say it before comparing


@dataclass(frozen=True)
class ReplayResult:
    """How a replay went.

    ``events``: events compared and found equal (all of them unless ``divergence``);
    ``digest``: the content digest of those events; ``prefix``: only the first ``events`` were
    compared (an unfinished trace, or ``--until``); ``replayed``: events the emulator wrote
    before it stopped.
    """

    source: str
    events: int
    digest: str
    prefix: bool
    replayed: int
    divergence: Divergence | None

    @property
    def identical(self) -> bool:
        return self.divergence is None


def version_note(written_by: str, source: str) -> str | None:
    if written_by == __version__:
        return None
    return (f"{source}: written by tdxtrace {written_by or '(unknown)'}, this is tdxtrace "
            f"{__version__}; the emulator may have changed since")


def plan_from_metadata(metadata: RunMetadata, source: str, *, force: bool) -> ReplayPlan:
    """The run a trace describes; a :class:`TdxtraceError` when it cannot be replayed."""
    if not metadata.scenario_text:
        producer = repr(metadata.producer) if metadata.producer else "an unknown producer"
        raise TdxtraceError(f"{source}: cannot replay: the trace holds no scenario to re-run "
                            f"(producer {producer}; only `tdxtrace record` stores one)")
    if metadata.producer != "emulator":
        raise TdxtraceError(f"{source}: cannot replay: metadata {META_PRODUCER} is "
                            f"{metadata.producer!r} but the trace holds a scenario (altered "
                            "metadata?)")
    if metadata.seed is None:
        raise TdxtraceError(f"{source}: cannot replay: no seed in the metadata")
    scenario = from_canonical(metadata.scenario_text, f"{source}: metadata {META_SCENARIO}")
    if scenario.policies() != metadata.policies:
        raise TdxtraceError(
            f"{source}: metadata {META_POLICIES} {canonical_json(metadata.policies)} "
            f"disagrees with the stored scenario's policies "
            f"{canonical_json(scenario.policies())} (altered metadata?)")
    if scenario.name != metadata.scenario_name:
        raise TdxtraceError(
            f"{source}: metadata {META_SCENARIO_NAME} {metadata.scenario_name!r} disagrees "
            f"with the stored scenario's name {scenario.name!r} (altered metadata?)")
    note = version_note(metadata.tdxtrace_version, source)
    if note is not None and not force:
        raise VersionMismatch(f"{note}: refusing to compare (use --force to replay anyway)")
    return ReplayPlan(scenario, metadata.seed, note)


class _EventReached(Exception):
    """Raised by :class:`_StopAtEvent` once the wanted event is written; carries the world."""

    def __init__(self, world: World) -> None:
        super().__init__("event reached")
        self.world = world


class _StopAtEvent(EventLog):
    """An event log that stops the whole run the moment event ``seq`` has been written.

    Creation, the run and teardown each drive the simulator themselves, so no stop condition
    of theirs covers all three; stopping at the log does. The rows up to ``seq`` are flushed to
    the sink first (so they are compared), then :class:`_EventReached` unwinds the run.
    """

    def __init__(self, world: World, sink: BatchSink, seq: int) -> None:
        super().__init__(sink, world.sim)
        self._world = world
        self._stop_at = seq + 1

    def emit(self, kind: int, **fields: Any) -> None:
        super().emit(kind, **fields)
        if self.events >= self._stop_at:
            self.flush()
            raise _EventReached(self._world)


class _WorldUntil(World):
    """A :class:`World` whose log stops the run at event ``seq``."""

    def __init__(self, scenario: Scenario, seed: int, sink: BatchSink, seq: int) -> None:
        self._until_seq = seq  # set first: World.__init__ calls make_log
        super().__init__(scenario, seed, sink)

    def make_log(self, sink: BatchSink) -> EventLog:
        return _StopAtEvent(self, sink, self._until_seq)


def run_until(scenario: Scenario, seed: int, sink: BatchSink, seq: int) -> World | None:
    """Run until event ``seq`` is written and return the world as it is at that moment.

    The state is everything the emulator did before writing event ``seq``, nothing after
    (the rest of that simulation step does not run). None when the run ends before ``seq``.
    """
    try:
        world = _WorldUntil(scenario, seed, sink, seq)
        world.run()
    except _EventReached as reached:
        return reached.world
    return None


def _limit_for(trace: Trace, until: int | None, source: str) -> int | None:
    events = trace.num_events()
    if until is not None:
        if until < 0 or until >= events:
            last = f"seq 0..{events - 1}" if events else "no events"
            raise TdxtraceError(f"{source}: --until {until}: the trace has {events} events "
                                f"({last})")
        return until + 1
    if trace.finished:
        return None
    if events == 0:
        raise TdxtraceError(f"{source}: nothing to replay against: the trace is unfinished and "
                            "holds no complete batch of events")
    return events


def replay_trace(trace: Trace, plan: ReplayPlan, *, until: int | None = None,
                 progress: Progress | None = None) -> tuple[ReplayResult, World | None]:
    """Replay ``trace`` following ``plan`` and compare it batch by batch.

    A finished trace is compared whole, then its summary (event count, digest, ground truth).
    An unfinished one is compared up to its last complete event; with ``until`` up to that
    ``seq``, and the :class:`World` is returned to read the model's state there.
    """
    source = str(trace.path) if trace.path else "trace"
    limit = _limit_for(trace, until, source)
    comparator = StreamComparator(trace.iter_batches(), limit=limit)
    world: World | None = None
    truth: dict[str, Any] | None = None
    try:
        if limit is not None:  # --until, or an unfinished trace: stop at its last event
            world = run_until(plan.scenario, plan.seed, comparator, limit - 1)
        else:
            truth = run_scenario(plan.scenario, plan.seed, comparator, progress)
    except ReplayStopped:
        pass  # the comparator has its answer
    except BaseException:
        comparator.close()
        raise
    comparator.finish()  # also closes the trace file
    divergence = comparator.divergence
    if divergence is None and limit is None and trace.summary is not None and truth is not None:
        divergence = summary_difference(trace.summary.events, trace.summary.digest,
                                        trace.summary.truth, comparator.compared,
                                        comparator.hexdigest(), truth)
    result = ReplayResult(source, comparator.compared, comparator.hexdigest(),
                          limit is not None, comparator.replayed, divergence)
    return result, (world if divergence is None and until is not None else None)


def summary_difference(events: int, digest: str, truth: dict[str, Any], replay_events: int,
                       replay_digest: str, replay_truth: dict[str, Any], *,
                       recorded_as: str = "the summary") -> Divergence | None:
    """Compare a recorded summary (or capsule) with what the replay produced."""
    if events != replay_events:
        return Divergence(None, f"{recorded_as} says {events} events; the replay produced "
                                f"{replay_events}")
    if digest != replay_digest:
        return Divergence(None, f"{recorded_as} says digest {digest}; the replayed events' "
                                f"digest is {replay_digest}")
    replay_truth = json.loads(canonical_json(replay_truth))  # as it would be stored
    if truth != replay_truth:
        keys = sorted(k for k in set(truth) | set(replay_truth)
                      if truth.get(k) != replay_truth.get(k))
        shown = "; ".join(f"{k}: recorded {json.dumps(truth.get(k))}, replayed "
                          f"{json.dumps(replay_truth.get(k))}" for k in keys[:3])
        more = f" (and {len(keys) - 3} more)" if len(keys) > 3 else ""
        return Divergence(None, f"the ground-truth counters differ: {shown}{more}")
    return None


def event_at(trace: Trace, seq: int) -> dict[str, Any] | None:
    """The recorded row with this ``seq`` (one vectorized scan), or None."""
    rows = trace.events().filter(pl.col("seq") == seq).head(1).collect().to_dicts()
    return rows[0] if rows else None
