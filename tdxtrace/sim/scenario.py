"""Scenarios: TOML files (built-in or the user's), validated against one declarative spec
(``scenario_spec.py``).

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
from tdxtrace.sim.scenario_spec import (
    COST_FIELDS,
    MAX_TOTAL_VCPUS,
    SPEC,
    TOP_LEVEL,
    Key,
    allowed_text,
    bound_text,
    shown_choice,
    toml_value,
)
from tdxtrace.strict_text import (
    MAX_NESTING,
    JSONValueError,
    deepest_key,
    load_json,
    toml_too_deep,
)


def _check_value(where: str, key: Key, value: Any) -> Any:
    given = value  # as the user spelled it, for the messages
    if key.normalize is not None and isinstance(value, key.type):
        value = key.normalize(value)
    if key.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, key.type) or isinstance(value, bool) != (key.type is bool):
        raise ScenarioError(f"{where}: expected {allowed_text(key)}, "
                            f"got {toml_value(value)}")
    if key.allowed and value not in key.allowed:
        raise ScenarioError(f"{where}: {given!r} is not allowed "
                            f"(allowed: {', '.join(map(shown_choice, key.allowed))})")
    if isinstance(value, float) and math.isnan(value):  # nan compares false with any limit
        raise ScenarioError(f"{where}: nan is not allowed (expected {allowed_text(key)})")
    number: Any = value
    if key.low is not None and number < key.low:
        raise ScenarioError(f"{where}: {value!r} is below the minimum {bound_text(key, key.low)} "
                            f"(expected {allowed_text(key)})")
    if key.high is not None and number > key.high:
        raise ScenarioError(f"{where}: {value!r} is above the limit {bound_text(key, key.high)} "
                            f"(expected {allowed_text(key)})")
    return value


# The guest's time is counted in touches of guest_touch ns each (world.guest_step divides by
# it): below 1 ns it would divide by zero, or let a vCPU run without simulated time passing.
_AT_LEAST_1_NS = {("guest_touch", "base_ns")}


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
                                    f"got {toml_value(field_value)}")
            low = 1 if (name, field_name) in _AT_LEAST_1_NS else 0
            if not low <= field_value <= limit:
                raise ScenarioError(f"{where}.{field_name}: {field_value!r} is outside "
                                    f"[{low}, {limit:g}]")
        out[name] = {k: float(v) for k, v in sorted(spec.items())}
    return dict(sorted(out.items()))


def resolve(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Validate a parsed scenario and fill in defaults; errors name ``source`` and the key."""
    out: dict[str, Any] = {"name": "custom", "description": ""}
    for key, value in raw.items():
        if key in TOP_LEVEL:
            if not isinstance(value, str):
                raise ScenarioError(f"{source}: {key}: expected text, "
                                    f"got {toml_value(value)}")
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


def _check_total_vcpus(source: str, scenario: dict[str, Any]) -> None:
    total = scenario["td"]["count"] * scenario["td"]["vcpus"]
    if total > MAX_TOTAL_VCPUS:
        raise ScenarioError(f"{source}: td.count x td.vcpus = {total} vCPUs is above the limit "
                            f"{MAX_TOTAL_VCPUS} (lower td.count or td.vcpus)")


def _key_parts(path: str) -> list[str]:
    """A dotted key as TOML reads it (so ``costs."mem.page.aug"`` works), else split on dots."""
    try:
        node: Any = tomllib.loads(f"{path.strip()} = 0")
    except tomllib.TOMLDecodeError:
        return [p for p in path.strip().split(".") if p]
    parts = []
    while isinstance(node, dict) and len(node) == 1:
        key = next(iter(node))
        parts.append(key)
        node = node[key]
    return parts


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (path, value); the value is TOML, or else a plain string."""
    if "=" not in text:
        raise ScenarioError(f"--set {text!r}: expected KEY=VALUE (e.g. td.vcpus=8)")
    path, value_text = text.split("=", 1)
    parts = _key_parts(path)
    if not parts:
        raise ScenarioError(f"--set {text!r}: empty key")
    if parts[0] == "costs" and len(parts) > 2:
        # Cost names have dots of their own (mem.page.aug): everything between "costs" and
        # an optional field name is the one name.
        field = parts[-1] if parts[-1] in COST_FIELDS else None
        name = ".".join(parts[1:-1] if field else parts[1:])
        parts = ["costs", name] + ([field] if field else [])
    too_deep = ScenarioError(f"--set {'.'.join(parts)}: the value is nested more than "
                             f"{MAX_NESTING} levels deep")
    if toml_too_deep(value_text) is not None:
        raise too_deep
    try:
        value = tomllib.loads(f"v = {value_text}")["v"]
    except tomllib.TOMLDecodeError:
        value = value_text
    if deepest_key(value) is not None:
        raise too_deep
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
        text, source = _read_file(path, name_or_path), str(path)
    else:
        raise ScenarioError(f"unknown scenario {name_or_path!r} (built-in: "
                            f"{', '.join(builtin_names())}; or give a .toml file)")
    raw = _parse_toml(text, source)
    for item in overrides:
        parts, value = parse_override(item)
        if parts[0] == "costs" and len(parts) > 1:
            _override_cost(raw, parts, value, item)
            continue
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ScenarioError(f"--set {item}: {part!r} is not a table")
        node[parts[-1]] = value
    return Scenario(resolve(raw, source))


def _read_file(path: Path, name: str) -> str:
    if path.is_dir():
        raise ScenarioError(f"{name}: is a directory, not a scenario file")
    if not path.exists():
        raise ScenarioError(f"{name}: no such scenario file")
    if not path.is_file():  # a FIFO would block the read, a device never end
        raise ScenarioError(f"{name}: not a regular file")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ScenarioError(f"{name}: cannot read: {err}") from None


def _parse_toml(text: str, source: str) -> dict[str, Any]:
    # A UTF-8 byte-order mark (Windows editors add one) is not TOML, but means nothing: skip it.
    text = text.removeprefix("\ufeff")
    deep = toml_too_deep(text)
    if deep is not None:
        raise ScenarioError(f"{source}: line {deep[0]}: {deep[1]}: arrays or inline tables "
                            f"nested more than {MAX_NESTING} levels deep")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ScenarioError(f"{source}: not valid TOML: {err}") from None
    except RecursionError:  # the scan above should make this unreachable
        raise ScenarioError(f"{source}: not valid TOML: values nested too deeply") from None
    key = deepest_key(raw)
    if key is not None:
        raise ScenarioError(f"{source}: {key}: tables nested more than {MAX_NESTING} levels "
                            "deep")
    return raw


def _override_cost(raw: dict[str, Any], parts: list[str], value: Any, item: str) -> None:
    """``costs.NAME=N`` sets NAME's base_ns, keeping its other fields; ``costs.NAME.FIELD=V``
    sets one field, keeping a base_ns given as a bare number."""
    costs = raw.setdefault("costs", {})
    if not isinstance(costs, dict):
        raise ScenarioError(f"--set {item}: 'costs' is not a table")
    name, field = parts[1], parts[2] if len(parts) > 2 else "base_ns"
    current = costs.get(name, {})
    spec = dict(current) if isinstance(current, dict) else {"base_ns": current}
    spec[field] = value
    costs[name] = spec


def from_canonical(text: str, source: str) -> Scenario:
    """Rebuild a scenario from the canonical JSON stored in a trace."""
    try:
        raw = load_json(text)
    except JSONValueError as err:
        raise ScenarioError(f"{source}: stored scenario: {err}") from None
    except json.JSONDecodeError as err:
        raise ScenarioError(f"{source}: stored scenario is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ScenarioError(f"{source}: stored scenario is not an object")
    return Scenario(resolve(raw, source))
