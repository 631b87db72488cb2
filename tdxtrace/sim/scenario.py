"""Scenarios: TOML files (built-in or the user's), validated against one declarative spec.

Every key has a type, a default, and either the allowed values or a range whose upper bound is
the largest size tdxtrace will attempt (refused before any work starts, with the limit named).
``--set section.key=value`` overrides any key; the value is read as a TOML value, falling back
to a plain string. The resolved scenario is stored in each trace as canonical JSON, which is
all ``replay`` needs to run it again.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tdxtrace.errors import ScenarioError
from tdxtrace.sim.costs import DEFAULT_STEP_COSTS, LEAF_BY_KEY


@dataclass(frozen=True)
class Key:
    type: type
    default: Any
    allowed: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    doc: str = ""


SPEC: dict[str, dict[str, Key]] = {
    "run": {
        "duration_us": Key(int, 20000, low=1, high=3_600_000_000,
                           doc="simulated time to run the TDs (µs)"),
        "max_events": Key(int, 0, low=0, high=2_000_000_000,
                          doc="stop after about this many events (0: no limit)"),
    },
    "host": {
        "lps": Key(int, 8, low=1, high=4096, doc="logical processors"),
        "packages": Key(int, 2, low=1, high=64, doc="CPU packages (sockets)"),
    },
    "td": {
        "count": Key(int, 1, low=1, high=64, doc="TDs on the host"),
        "vcpus": Key(int, 4, low=1, high=1024, doc="vCPUs per TD"),
        "memory_mb": Key(int, 64, low=1, high=4 * 1024 * 1024, doc="private memory per TD"),
    },
    "policy": {
        "frozen_spte": Key(str, "local_retry", ("local_retry", "resume_guest"),
                           doc="what RET_PF_RETRY does on the private fault path"),
        "zap_busy": Key(str, "kick_retry_once",
                        ("kick_retry_once", "retry_loop", "seamcall_spinlock"),
                        doc="OPERAND_BUSY handling on the zap path"),
        "zap_scope": Key(str, "range_leafs", ("range_leafs", "all_roots", "everything"),
                         doc="what a memslot/notifier change zaps"),
        "hkid_release": Key(str, "late", ("late", "early"), doc="TD teardown order"),
    },
    "guest": {
        "workload": Key(str, "sequential", ("sequential", "random", "hot"),
                        doc="which private pages the vCPUs touch"),
        "hot_pages": Key(int, 16, low=1, high=1 << 30, doc="size of the shared hot set"),
        "hot_fraction": Key(float, 0.5, low=0.0, high=1.0,
                            doc="share of touches that go to the hot set"),
        "timer_hz": Key(int, 250, low=1, high=100_000, doc="guest timer interrupts per second"),
        "max_touches": Key(int, 64, low=1, high=100_000,
                           doc="touches of mapped pages the guest does per scheduling step"),
        "shared_fraction": Key(float, 0.0, low=0.0, high=1.0,
                               doc="share of touches that go to shared memory (direct root)"),
        "shared_pages": Key(int, 512, low=1, high=1 << 30,
                            doc="size of the shared window (its own memslot), in 4K pages"),
    },
    "kvm": {
        "preempt_p": Key(float, 0.0, low=0.0, high=1.0,
                         doc="chance the host thread is preempted while a mirror SPTE it "
                             "froze is held"),
        "preempt_ns": Key(int, 50000, low=0, high=10_000_000_000, doc="length of it"),
        "signal_p": Key(float, 0.0, low=0.0, high=1.0,
                        doc="chance a local-retry turn finds a signal pending"),
    },
    "vmm": {
        "zap_interval_us": Key(int, 0, low=0, high=3_600_000_000,
                               doc="how often the VMM zaps private memory (0: never)"),
        "zap_pages": Key(int, 64, low=1, high=1 << 30, doc="pages per zap"),
        "zap_reason": Key(str, "truncation", ("truncation", "conversion"),
                          doc="hole punch, or a private->shared attribute change"),
        "memslot_interval_us": Key(int, 0, low=0, high=3_600_000_000,
                                   doc="how often the VMM changes the shared memslot (0: never)"),
        "notifier_interval_us": Key(int, 0, low=0, high=3_600_000_000,
                                    doc="how often an mmu_notifier invalidation hits the VMM's "
                                        "mapping of guest memory (0: never)"),
        "notifier_pages": Key(int, 64, low=1, high=1 << 30,
                              doc="pages per mmu_notifier invalidation"),
    },
    "mapgpa": {
        "interval_us": Key(int, 0, low=0, high=3_600_000_000,
                           doc="how often a vCPU of each TD converts a range (0: never)"),
        "size_kb": Key(int, 4096, low=1, high=64 * 1024 * 1024,
                       doc="bytes per conversion in KiB (not a multiple of 4: ALIGN_ERROR)"),
        "direction": Key(str, "alternate", ("alternate", "to_shared", "to_private"),
                         doc="alternate: to shared, then the same range back to private"),
        "max_retries": Key(int, 3, low=1, high=1000,
                           doc="guest: consecutive no-progress RETRYs before giving up"),
        "vmm": Key(str, "complete", ("complete", "partial", "no_progress", "bad_r11", "reject"),
                   doc="how the VMM answers each userspace exit"),
        "partial_pages": Key(int, 512, low=1, high=1 << 30,
                             doc="partial: pages converted per TDVMCALL before EAGAIN"),
        "no_progress_calls": Key(int, 3, low=0, high=1000,
                                 doc="no_progress: EAGAINs without progress per conversion"),
    },
    "faults": {
        "spurious_busy_leaf": Key(str, "", doc="leaf that sometimes returns OPERAND_BUSY "
                                               "(e.g. mem.page.aug); empty: none"),
        "spurious_busy_p": Key(float, 0.0, low=0.0, high=1.0, doc="its probability"),
        "ipi_delay_p": Key(float, 0.0, low=0.0, high=1.0, doc="chance an IPI is delayed"),
        "ipi_delay_ns": Key(int, 20000, low=0, high=10_000_000_000, doc="by how much"),
        "mapgpa_interrupt_p": Key(float, 0.0, low=0.0, high=1.0,
                                  doc="chance an interrupt is pending after each MapGPA chunk"),
        "vcpu_load_during_teardown_p": Key(
            float, 0.0, low=0.0, high=1.0,
            doc="chance, per TD teardown, that a vCPU is loaded and entered again between the "
                "VP.FLUSH round and VPFLUSHDONE (seed 001)"),
        "skip_flush_on_migrate_p": Key(
            float, 0.0, low=0.0, high=1.0,
            doc="chance a migration skips VP.FLUSH on the old LP (an injected KVM bug)"),
    },
    # TD teardown after the run (lifecycle.py, docs/calibration.md).
    "teardown": {
        "enabled": Key(bool, True, doc="tear every TD down after the run"),
        "flush_loop": Key(str, "resend_flush", ("resend_flush", "vpflushdone_only"),
                          doc="on FLUSHVP_NOT_DONE: VP.FLUSH every vCPU again, or only "
                              "re-issue VPFLUSHDONE (seed 001)"),
        "vpflushdone_tries": Key(int, 3, low=1, high=10000,
                                 doc="VPFLUSHDONE attempts before the HKID is leaked (1: "
                                     "mainline, no loop)"),
        "cache_wb_blocks": Key(int, 4, low=1, high=100_000,
                               doc="sub-blocks of a package's CACHE.WB; every one but the last "
                                   "returns INTERRUPTED_RESUMABLE"),
        "prepopulate": Key(bool, False, doc="start with all private memory mapped and "
                                            "accepted (no rows), as a long-running TD"),
        "row_pages": Key(int, 64, low=0, high=1 << 30,
                         doc="pages per teardown phase recorded one row per SEAMCALL; the "
                             "rest are batched rows with arg1 = pages"),
    },
    "migration": {
        "rate_hz": Key(float, 0.0, low=0.0, high=1_000_000.0,
                       doc="migrations per second per vCPU between LPs (0: none)"),
    },
}
TOP_LEVEL = {"name": str, "description": str}
COST_FIELDS = ("base_ns", "jitter", "tail_p", "tail_x")


def _bound(key: Key, bound: float) -> str:
    return f"{bound:g}" if key.type is float else str(int(bound))


def allowed_text(key: Key) -> str:
    """What a key accepts, in words, for error messages."""
    if key.allowed:
        return "one of " + ", ".join(map(str, key.allowed))
    kinds = {int: "an integer", float: "a number", str: "text", bool: "true or false"}
    kind = kinds.get(key.type, key.type.__name__)
    if key.low is not None and key.high is not None:
        return f"{kind} from {_bound(key, key.low)} to {_bound(key, key.high)}"
    return kind


def _check_value(where: str, key: Key, value: Any) -> Any:
    if key.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, key.type) or isinstance(value, bool) != (key.type is bool):
        raise ScenarioError(f"{where}: expected {allowed_text(key)}, got {value!r}")
    if key.allowed and value not in key.allowed:
        raise ScenarioError(f"{where}: {value!r} is not allowed "
                            f"(allowed: {', '.join(map(str, key.allowed))})")
    if isinstance(value, float) and math.isnan(value):  # nan compares false with any limit
        raise ScenarioError(f"{where}: nan is not allowed (expected {allowed_text(key)})")
    number: Any = value
    if key.low is not None and number < key.low:
        raise ScenarioError(f"{where}: {value!r} is below the minimum {_bound(key, key.low)} "
                            f"(expected {allowed_text(key)})")
    if key.high is not None and number > key.high:
        raise ScenarioError(f"{where}: {value!r} is above the limit {_bound(key, key.high)} "
                            f"(expected {allowed_text(key)})")
    return value


def _check_costs(source: str, table: Any) -> dict[str, dict[str, float]]:
    if not isinstance(table, dict):
        raise ScenarioError(f"{source}: costs: expected a table")
    known = sorted(set(LEAF_BY_KEY) | set(DEFAULT_STEP_COSTS))
    out: dict[str, dict[str, float]] = {}
    for name, value in table.items():
        where = f"{source}: costs.{name}"
        if name not in LEAF_BY_KEY and name not in DEFAULT_STEP_COSTS:
            raise ScenarioError(f"{where}: unknown cost (known: {', '.join(known)})")
        spec = {"base_ns": value} if not isinstance(value, dict) else dict(value)
        for field_name, field_value in spec.items():
            if field_name not in COST_FIELDS:
                raise ScenarioError(f"{where}.{field_name}: unknown field "
                                    f"(allowed: {', '.join(COST_FIELDS)})")
            limit = 10**12 if field_name == "base_ns" else 10**6
            if not isinstance(field_value, int | float) or isinstance(field_value, bool):
                raise ScenarioError(f"{where}.{field_name}: expected a number, "
                                    f"got {field_value!r}")
            if not 0 <= field_value <= limit:
                raise ScenarioError(f"{where}.{field_name}: {field_value!r} is outside "
                                    f"[0, {limit:g}]")
        out[name] = {k: float(v) for k, v in sorted(spec.items())}
    return dict(sorted(out.items()))


def resolve(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Validate a parsed scenario and fill in defaults; errors name ``source`` and the key."""
    out: dict[str, Any] = {"name": "custom", "description": ""}
    for key, value in raw.items():
        if key in TOP_LEVEL:
            if not isinstance(value, str):
                raise ScenarioError(f"{source}: {key}: expected str, got {value!r}")
            out[key] = value
        elif key == "costs":
            out["costs"] = _check_costs(source, value)
        elif key not in SPEC:
            allowed = ", ".join(sorted([*SPEC, *TOP_LEVEL, "costs"]))
            raise ScenarioError(f"{source}: unknown section or key {key!r} (allowed: {allowed})")
        elif not isinstance(value, dict):
            raise ScenarioError(f"{source}: {key}: expected a table")
    for section, keys in SPEC.items():
        given = raw.get(section, {})
        for name in given:
            if name not in keys:
                raise ScenarioError(f"{source}: unknown key {section}.{name} "
                                    f"(allowed: {', '.join(keys)})")
        out[section] = {name: _check_value(f"{source}: {section}.{name}", spec,
                                           given.get(name, spec.default))
                        for name, spec in keys.items()}
    out.setdefault("costs", {})
    _check_total_vcpus(source, out)
    return out


# Each key has its own limit; the emulator's work grows with the vCPUs of all TDs together
# (about 3 s per 1024 vCPUs per simulated millisecond), so their product has one too.
MAX_TOTAL_VCPUS = 4096


def _check_total_vcpus(source: str, scenario: dict[str, Any]) -> None:
    total = scenario["td"]["count"] * scenario["td"]["vcpus"]
    if total > MAX_TOTAL_VCPUS:
        raise ScenarioError(f"{source}: td.count x td.vcpus = {total} vCPUs is above the limit "
                            f"{MAX_TOTAL_VCPUS} (lower td.count or td.vcpus)")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (path, value); the value is TOML, or else a plain string."""
    if "=" not in text:
        raise ScenarioError(f"--set {text!r}: expected KEY=VALUE (e.g. td.vcpus=8)")
    path, value_text = text.split("=", 1)
    parts = [p for p in path.strip().split(".") if p]
    if not parts:
        raise ScenarioError(f"--set {text!r}: empty key")
    try:
        value = tomllib.loads(f"v = {value_text}")["v"]
    except tomllib.TOMLDecodeError:
        value = value_text
    return parts, value


@dataclass(frozen=True)
class Scenario:
    """A resolved scenario: sections as attribute namespaces plus the canonical text."""

    data: dict[str, Any]

    def __getattr__(self, section: str) -> Any:
        try:
            return SimpleNamespace(**self.data[section])
        except KeyError:
            raise AttributeError(section) from None

    @property
    def name(self) -> str:
        return str(self.data["name"])

    def canonical(self) -> str:
        return json.dumps(self.data, sort_keys=True, separators=(",", ":"))

    def policies(self) -> dict[str, str]:
        return dict(sorted(self.data["policy"].items()))


def builtin_names() -> list[str]:
    folder = resources.files("tdxtrace") / "scenarios"
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir()
                  if p.name.endswith(".toml"))


def load_scenario(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Scenario:
    """A built-in scenario by name, or a TOML file by path, with ``--set`` overrides."""
    path = Path(name_or_path)
    if name_or_path in builtin_names():
        res = resources.files("tdxtrace") / "scenarios" / f"{name_or_path}.toml"
        text, source = res.read_text(encoding="utf-8"), f"{name_or_path} (built-in)"
    elif path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ScenarioError(f"{name_or_path}: no such scenario file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ScenarioError(f"{name_or_path}: cannot read: {err}") from None
        source = str(path)
    else:
        raise ScenarioError(f"unknown scenario {name_or_path!r} (built-in: "
                            f"{', '.join(builtin_names())}; or give a .toml file)")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ScenarioError(f"{source}: not valid TOML: {err}") from None
    for item in overrides:
        parts, value = parse_override(item)
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ScenarioError(f"--set {item}: {part!r} is not a table")
        node[parts[-1]] = value
    return Scenario(resolve(raw, source))


def from_canonical(text: str, source: str) -> Scenario:
    """Rebuild a scenario from the canonical JSON stored in a trace."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise ScenarioError(f"{source}: stored scenario is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ScenarioError(f"{source}: stored scenario is not an object")
    return Scenario(resolve(raw, source))
