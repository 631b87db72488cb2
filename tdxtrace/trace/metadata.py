"""Run metadata and the end-of-run summary, and their encoding as Arrow custom metadata.

Both are stored as UTF-8 text under the ``tdxtrace.*`` keys of :mod:`tdxtrace.schema`. Nothing
here depends on the machine or the moment a trace was written (no wall clock, host or path), so
two identical runs produce identical metadata. JSON values are written with sorted keys for the
same reason.

Reading is stricter than Python's json module (:func:`tdxtrace.strict_text.load_json`), since
the text may have been edited by hand: values nested too deep and non-finite numbers are
refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tdxtrace._version import __version__
from tdxtrace.errors import TraceFormatError
from tdxtrace.schema import (
    FORMAT_NAME,
    META_FORMAT,
    META_POLICIES,
    META_PRODUCER,
    META_SCENARIO,
    META_SCENARIO_NAME,
    META_SCHEMA_VERSION,
    META_SEED,
    META_VERSION,
    SCHEMA_VERSION,
    SUMMARY_DIGEST,
    SUMMARY_EVENTS,
    SUMMARY_TRUTH,
)
from tdxtrace.strict_text import MAX_NESTING, JSONValueError, json_too_deep, load_json


def canonical_json(value: Any) -> str:
    """JSON text that is the same for equal values: sorted keys, no optional whitespace."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _decode(meta: dict[bytes, bytes] | None) -> dict[str, str]:
    if not meta:
        return {}
    return {k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in meta.items()}


def _parse_int(text: str, key: str, source: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise TraceFormatError(
            f"{source}: metadata {key} is {text!r}, expected a decimal integer") from None


def _parse_json_object(text: str, key: str, source: str) -> dict[str, Any]:
    try:
        value = load_json(text)
    except JSONValueError as err:
        raise TraceFormatError(f"{source}: metadata {key}: {err}") from None
    except ValueError:
        raise TraceFormatError(f"{source}: metadata {key} is not valid JSON") from None
    if not isinstance(value, dict):
        raise TraceFormatError(f"{source}: metadata {key} must be a JSON object")
    return value


@dataclass(frozen=True)
class RunMetadata:
    """What produced a trace: enough to describe it, and (for the emulator) to replay it."""

    producer: str = "emulator"  # or an importer's name
    scenario_name: str = ""
    scenario_text: str = ""  # canonical scenario text (JSON); "" for imports
    seed: int | None = None
    policies: dict[str, str] = field(default_factory=dict)
    tdxtrace_version: str = __version__
    schema_version: int = SCHEMA_VERSION

    def to_arrow(self) -> dict[str, str]:
        """The schema custom metadata (META_* keys) that records this run."""
        return {
            META_FORMAT: FORMAT_NAME,
            META_SCHEMA_VERSION: str(self.schema_version),
            META_VERSION: self.tdxtrace_version,
            META_PRODUCER: self.producer,
            META_SCENARIO_NAME: self.scenario_name,
            META_SCENARIO: self.scenario_text,
            META_SEED: "" if self.seed is None else str(self.seed),
            META_POLICIES: canonical_json(self.policies),
        }

    @classmethod
    def from_arrow(cls, meta: dict[bytes, bytes] | None, *, source: str) -> RunMetadata:
        """Decode a schema's custom metadata; errors name ``source`` (usually the file)."""
        text = _decode(meta)
        fmt = text.get(META_FORMAT)
        if fmt is None:
            raise TraceFormatError(
                f"{source}: not a tdxtrace trace (no {META_FORMAT} metadata)")
        if fmt != FORMAT_NAME:
            raise TraceFormatError(
                f"{source}: not a tdxtrace trace ({META_FORMAT} is {fmt!r})")
        if META_SCHEMA_VERSION not in text:
            raise TraceFormatError(f"{source}: metadata {META_SCHEMA_VERSION} is missing")
        version = _parse_int(text[META_SCHEMA_VERSION], META_SCHEMA_VERSION, source)
        if version != SCHEMA_VERSION:
            raise TraceFormatError(
                f"{source}: schema version {version} is not supported "
                f"(this tdxtrace reads {SCHEMA_VERSION})")
        seed_text = text.get(META_SEED, "")
        seed = _parse_int(seed_text, META_SEED, source) if seed_text else None
        policies = _parse_json_object(text.get(META_POLICIES) or "{}", META_POLICIES, source)
        scenario_text = text.get(META_SCENARIO, "")
        # Parsed only by replay and capsule, but bounded here, as the other JSON values are,
        # so that every command gives the same one line for it.
        deep = json_too_deep(scenario_text)
        if deep is not None:
            under = f" (under key {deep!r})" if deep else ""
            raise TraceFormatError(f"{source}: metadata {META_SCENARIO}: values are nested "
                                   f"more than {MAX_NESTING} levels deep{under}")
        if not all(isinstance(v, str) for v in policies.values()):
            raise TraceFormatError(
                f"{source}: metadata {META_POLICIES} must map policy names to text")
        return cls(
            producer=text.get(META_PRODUCER, ""),
            scenario_name=text.get(META_SCENARIO_NAME, ""),
            scenario_text=scenario_text,
            seed=seed,
            policies=dict(sorted(policies.items())),
            tdxtrace_version=text.get(META_VERSION, ""),
            schema_version=version,
        )


@dataclass(frozen=True)
class Summary:
    """What a finished trace holds: written once, when the writer closes."""

    events: int
    digest: str  # "sha256:<hex>", see tdxtrace.trace.digest
    truth: dict[str, Any]  # ground-truth counters (JSON-able); {} for imports

    def to_arrow(self) -> dict[str, str]:
        """The custom metadata of the final, empty record batch (SUMMARY_* keys)."""
        return {
            SUMMARY_EVENTS: str(self.events),
            SUMMARY_DIGEST: self.digest,
            SUMMARY_TRUTH: canonical_json(self.truth),
        }

    @classmethod
    def from_arrow(cls, meta: dict[bytes, bytes] | None, *, source: str) -> Summary | None:
        """Decode a batch's custom metadata; None when it is not a summary."""
        text = _decode(meta)
        if SUMMARY_EVENTS not in text:
            return None
        events = _parse_int(text[SUMMARY_EVENTS], SUMMARY_EVENTS, source)
        digest = text.get(SUMMARY_DIGEST, "")
        if not digest.startswith("sha256:"):
            raise TraceFormatError(
                f"{source}: metadata {SUMMARY_DIGEST} is {digest!r}, expected 'sha256:<hex>'")
        truth = _parse_json_object(text.get(SUMMARY_TRUTH) or "{}", SUMMARY_TRUTH, source)
        return cls(events=events, digest=digest, truth=truth)
