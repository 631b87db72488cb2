"""Reproduction capsules: a few kilobytes that let another machine replay a run without its trace.

A capsule is a JSON file holding what replay needs (the resolved scenario, the seed, the
tdxtrace version) and what the run produced (event count, content digest, ground-truth
counters). ``tdxtrace replay --capsule FILE`` runs the scenario again and checks the digest.
It cannot say *where* a run diverges (it holds no events): replay the trace itself for that.

Layout (keys sorted, UTF-8)::

    {"capsule_version": 1, "digest": "sha256:...", "events": 165679,
     "format": "tdxtrace-capsule", "policies": {...}, "scenario": {...resolved scenario...},
     "scenario_name": "fault-storm", "schema_version": 1, "seed": 1,
     "tdxtrace_version": "0.1.0", "truth": {...}}
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from tdxtrace.errors import TdxtraceError
from tdxtrace.outputs import check_output, make_folder, os_reason, write_output
from tdxtrace.replay.compare import Divergence
from tdxtrace.replay.runner import (
    ReplayPlan,
    ReplayResult,
    plan_from_metadata,
    summary_difference,
)
from tdxtrace.schema import META_SCENARIO, META_SEED, SCHEMA_VERSION
from tdxtrace.sim.emulator import Progress, run_scenario
from tdxtrace.strict_text import JSONValueError, load_json
from tdxtrace.trace import RunMetadata, Trace
from tdxtrace.trace.digest import ContentDigest

CAPSULE_FORMAT = "tdxtrace-capsule"
CAPSULE_VERSION = 1
# A capsule is a few kilobytes (the resolved scenario, counters, a digest: 2.6 KB for the demo
# run). Reading is refused far above any real one, before a byte is read: a capsule argument
# that is some other big file (or /dev/zero) must not be read into memory whole.
MAX_CAPSULE_BYTES = 4 << 20


@dataclass(frozen=True)
class Capsule:
    """One run, reproducible: its inputs and a fingerprint of its output."""

    scenario_name: str
    scenario: dict[str, Any]  # the resolved scenario (what the trace stores as canonical text)
    seed: int
    policies: dict[str, str]
    tdxtrace_version: str
    schema_version: int
    events: int
    digest: str
    truth: dict[str, Any]

    def to_json(self, *, ensure_ascii: bool = False) -> str:
        doc = {
            "format": CAPSULE_FORMAT, "capsule_version": CAPSULE_VERSION,
            "scenario_name": self.scenario_name, "scenario": self.scenario, "seed": self.seed,
            "policies": self.policies, "tdxtrace_version": self.tdxtrace_version,
            "schema_version": self.schema_version, "events": self.events,
            "digest": self.digest, "truth": self.truth,
        }
        return json.dumps(doc, sort_keys=True, indent=1, ensure_ascii=ensure_ascii) + "\n"

    def metadata(self) -> RunMetadata:
        """The run metadata a trace of this run carries."""
        return RunMetadata(producer="emulator", scenario_name=self.scenario_name,
                           scenario_text=json.dumps(self.scenario, sort_keys=True,
                                                    separators=(",", ":")),
                           seed=self.seed, policies=dict(self.policies),
                           tdxtrace_version=self.tdxtrace_version,
                           schema_version=self.schema_version)


def capsule_from_trace(trace: Trace) -> Capsule:
    """A capsule for a finished, replayable trace (open_trace has checked its digest)."""
    source = str(trace.path) if trace.path else "trace"
    meta = trace.metadata
    if not meta.scenario_text:
        raise TdxtraceError(f"{source}: cannot make a capsule: no scenario (metadata "
                            f"{META_SCENARIO} is empty; the trace was produced by "
                            f"{meta.producer or 'an unknown producer'!r})")
    if meta.seed is None:
        raise TdxtraceError(f"{source}: cannot make a capsule: no seed (metadata {META_SEED} "
                            "is empty), so the run cannot be repeated")
    if trace.summary is None:
        raise TdxtraceError(f"{source}: cannot make a capsule: the trace is unfinished (no "
                            "summary, so no digest of the whole run)")
    scenario = plan_from_metadata(meta, source, force=True).scenario
    return Capsule(meta.scenario_name, scenario.data, meta.seed, dict(meta.policies),
                   meta.tdxtrace_version, meta.schema_version, trace.summary.events,
                   trace.summary.digest, dict(trace.summary.truth))


def write_capsule(capsule: Capsule, path: Path, *, force: bool = False,
                  inputs: Sequence[Path | None] = ()) -> None:
    """Write ``path`` through a temporary name, so it is either whole or absent.

    ``inputs`` (the trace the capsule was made from) must not be ``path``, even with ``force``.
    """
    check_output(path, force=force, inputs=inputs)  # before the folder: its words are clearer
    make_folder(path)  # a missing folder is created, as for every other output
    text = capsule.to_json()
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, read from a "\udcff" escape in the trace
        data = capsule.to_json(ensure_ascii=True).encode("ascii")  # the same JSON value
    write_output(path, data, force=force, inputs=inputs)


def _field(doc: dict[str, Any], key: str, kind: type | tuple[type, ...], source: str) -> Any:
    if key not in doc:
        raise TdxtraceError(f"{source}: capsule key {key!r} is missing")
    value = doc[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TdxtraceError(f"{source}: capsule key {key!r} has the wrong type "
                            f"({type(value).__name__})")
    return value


def _read_text(path: Path, source: str) -> str:
    """The file's text, if it is a regular file of at most MAX_CAPSULE_BYTES of UTF-8.

    Opened without blocking and checked on the open file: a FIFO would block the open (and
    the read) forever, a device (/dev/zero) never ends; traces get the same check.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise TdxtraceError(f"{source}: does not exist") from None
    except OSError as err:
        raise TdxtraceError(f"{source}: cannot read: {os_reason(err)}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        if stat.S_ISDIR(info.st_mode):
            raise TdxtraceError(f"{source}: is a directory, not a capsule file")
        raise TdxtraceError(f"{source}: not a regular file")
    with os.fdopen(fd, "rb") as handle:
        too_big = (f"{source}: not a tdxtrace capsule (larger than {MAX_CAPSULE_BYTES >> 20} "
                   "MiB; a capsule is a few kilobytes)")
        if info.st_size > MAX_CAPSULE_BYTES:
            raise TdxtraceError(too_big)
        try:
            data = handle.read(MAX_CAPSULE_BYTES + 1)  # bounded, should it grow meanwhile
        except OSError as err:
            raise TdxtraceError(f"{source}: cannot read: {os_reason(err)}") from None
    if len(data) > MAX_CAPSULE_BYTES:
        raise TdxtraceError(too_big)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TdxtraceError(f"{source}: not a tdxtrace capsule (not UTF-8 text: byte "
                            f"{err.start})") from None


def read_capsule(path: Path) -> Capsule:
    """Read and check a capsule; errors name the file and the key."""
    source = str(path)
    text = _read_text(path, source)
    try:
        doc = load_json(text)
    except JSONValueError as err:
        raise TdxtraceError(f"{source}: capsule: {err}") from None
    except ValueError:
        raise TdxtraceError(f"{source}: not a tdxtrace capsule (not JSON)") from None
    if not isinstance(doc, dict) or doc.get("format") != CAPSULE_FORMAT:
        raise TdxtraceError(f"{source}: not a tdxtrace capsule (no \"format\": "
                            f"\"{CAPSULE_FORMAT}\")")
    version = _field(doc, "capsule_version", int, source)
    if version != CAPSULE_VERSION:
        raise TdxtraceError(f"{source}: capsule version {version} is not supported (this "
                            f"tdxtrace reads {CAPSULE_VERSION})")
    schema_version = _field(doc, "schema_version", int, source)
    if schema_version != SCHEMA_VERSION:
        raise TdxtraceError(f"{source}: schema version {schema_version} is not supported "
                            f"(this tdxtrace reads {SCHEMA_VERSION})")
    digest = _field(doc, "digest", str, source)
    if not digest.startswith("sha256:"):
        raise TdxtraceError(f"{source}: capsule key 'digest' is {digest!r}, expected "
                            "'sha256:<hex>'")
    policies = _field(doc, "policies", dict, source)
    return Capsule(
        scenario_name=_field(doc, "scenario_name", str, source),
        scenario=_field(doc, "scenario", dict, source), seed=_field(doc, "seed", int, source),
        policies={str(k): str(v) for k, v in policies.items()},
        tdxtrace_version=_field(doc, "tdxtrace_version", str, source),
        schema_version=schema_version, events=_field(doc, "events", int, source),
        digest=digest, truth=_field(doc, "truth", dict, source))


def plan_from_capsule(capsule: Capsule, source: str, *, force: bool) -> ReplayPlan:
    """The run a capsule describes, with the same checks as a trace's metadata."""
    return plan_from_metadata(capsule.metadata(), source, force=force)


def replay_capsule(capsule: Capsule, plan: ReplayPlan, source: str, *,
                   progress: Progress | None = None) -> ReplayResult:
    """Run the capsule's scenario again; compare event count, digest and ground truth."""
    digest = ContentDigest()
    events = 0

    def sink(batch: pa.RecordBatch) -> None:
        nonlocal events
        digest.update(batch)
        events += batch.num_rows

    truth = run_scenario(plan.scenario, plan.seed, sink, progress)
    replay_digest = digest.hexdigest()
    divergence = summary_difference(capsule.events, capsule.digest, capsule.truth, events,
                                    replay_digest, truth, recorded_as="the capsule")
    if divergence is not None:
        divergence = Divergence(None, divergence.reason + " (a capsule holds no events: "
                                "replay the trace itself to find the first divergent event)")
    return ReplayResult(source, events, replay_digest, False, events, divergence)
