"""Scenarios under attack: hypothesis-made TOML and values.

Whatever the text or value, loading a scenario either succeeds or raises one
:class:`ScenarioError` line that names the file and the key and says what is allowed (the
values of an enumeration, the range of a number). A size above its limit (or a combination
of sizes above theirs) is refused by ``record`` before any work starts: nothing is written.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tdxtrace.cli import main
from tdxtrace.errors import ScenarioError
from tdxtrace.sim.scenario import (
    MAX_TOTAL_VCPUS,
    SPEC,
    Key,
    allowed_text,
    load_scenario,
    resolve,
)

SOURCE = "mine.toml"
KEYS = sorted((section, name) for section, keys in SPEC.items() for name in keys)
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(),
                                                         max_size=2))


def _is_valid(key: Key, value: Any) -> bool:
    if isinstance(value, bool) != (key.type is bool):
        return False
    if key.type is float and isinstance(value, int):
        value = float(value)
    if not isinstance(value, key.type):
        return False
    if key.normalize is not None:
        value = key.normalize(value)
    if key.allowed:
        return value in key.allowed
    if isinstance(value, float) and math.isnan(value):
        return False
    return ((key.low is None or value >= key.low) and (key.high is None or value <= key.high))


def _base() -> dict[str, Any]:
    return {"name": "mine", "td": {"vcpus": 2}}


@FUZZ
@given(where=st.sampled_from(KEYS), value=ANY_VALUE)
def test_a_bad_value_names_the_key_and_what_is_allowed(where: tuple[str, str],
                                                        value: Any) -> None:
    section, name = where
    key = SPEC[section][name]
    raw = _base()
    raw.setdefault(section, {})[name] = value
    if _is_valid(key, value):
        assume(not (section == "td" and raw["td"].get("count", 1) * raw["td"]["vcpus"]
                    > MAX_TOTAL_VCPUS))
        stored = key.normalize(value) if key.normalize is not None else value
        assert resolve(raw, SOURCE)[section][name] == stored
        return
    with pytest.raises(ScenarioError) as caught:
        resolve(raw, SOURCE)
    message = str(caught.value)
    assert message.startswith(f"{SOURCE}: {section}.{name}: ") and "\n" not in message
    if key.allowed:
        assert all(str(option) in message for option in key.allowed), message
    else:
        assert allowed_text(key) in message, message


@pytest.mark.parametrize(("value", "shown"), [
    (True, "true"), (False, "false"), ([1], "an array"), ({"a": 1}, "a table"), ("8", "'8'")])
def test_a_wrong_type_is_shown_as_toml_spells_it(value: Any, shown: str) -> None:
    raw = _base()
    raw["td"]["vcpus"] = value
    with pytest.raises(ScenarioError) as caught:
        resolve(raw, SOURCE)
    assert str(caught.value) == (f"{SOURCE}: td.vcpus: expected an integer from 1 to "
                                 f"{SPEC['td']['vcpus'].high}, got {shown}")


@FUZZ
@given(section=st.sampled_from(sorted(SPEC)),
       name=st.from_regex(r"[a-z_]{1,12}", fullmatch=True))
def test_an_unknown_key_names_itself_and_the_known_ones(section: str, name: str) -> None:
    assume(name not in SPEC[section])
    raw = {section: {name: 1}}
    with pytest.raises(ScenarioError) as caught:
        resolve(raw, SOURCE)
    assert str(caught.value) == (f"{SOURCE}: unknown key {section}.{name} "
                                 f"(allowed: {', '.join(SPEC[section])})")


TOML_PIECES = st.sampled_from([
    "[td]\n", "[policy]\n", "[run]\n", "[[td]]\n", "vcpus = 4\n", "vcpus = -4\n",
    "frozen_spte = 'maybe'\n", "duration_us = 1e99\n", "x = \n", "= 3\n", "'\n", "\"\"\"\n",
    "[td.inner]\n", "a.b.c = 1\n", "name = 3\n", "memory_mb = 0x7fffffffffffffff\n",
    "hot_fraction = nan\n", "workload = [1, 2]\n", "\x00", "é = 1\n", "[costs]\n",
    "kick = -1\n", "kick = { base_ns = 'x' }\n", "vcpus = 4\nvcpus = 5\n",
])


@FUZZ
@given(text=st.one_of(st.lists(TOML_PIECES, max_size=8).map("".join),
                      st.text(max_size=200)))
def test_any_toml_text_loads_or_gives_one_line_naming_the_file(tmp_path_factory:
                                                                 pytest.TempPathFactory,
                                                                 text: str) -> None:
    path = tmp_path_factory.mktemp("s") / "mine.toml"
    path.write_text(text, encoding="utf-8")
    try:
        scenario = load_scenario(str(path))
    except ScenarioError as err:
        message = str(err)
        assert message.startswith(f"{path}: ") and "\n" not in message.strip(), message
        return
    assert scenario.canonical()  # it loaded: every key was checked and defaulted


@FUZZ
@given(key=st.from_regex(r"[a-z_.]{0,20}", fullmatch=True), value=st.text(max_size=30))
def test_any_set_override_loads_or_gives_one_line(key: str, value: str) -> None:
    assume("\n" not in value and "\r" not in value)
    try:
        load_scenario("zero-step", [f"{key}={value}"])
    except ScenarioError as err:
        message = str(err)
        assert "\n" not in message
        assert message.startswith(("zero-step (built-in): ", "--set ")), message


def test_toml_errors_say_where(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text("[td]\nvcpus = = 4\n")
    with pytest.raises(ScenarioError, match=rf"^{path}: not valid TOML: .*line 2"):
        load_scenario(str(path))


@pytest.mark.parametrize(("override", "limit"), [
    *[(f"{s}.{n}={int(SPEC[s][n].high) + 1}", f"above the limit {int(SPEC[s][n].high)}")
      for s, n in KEYS if SPEC[s][n].type is int and SPEC[s][n].high is not None],
    ("td.memory_mb=4194305", "above the limit 4194304"),
])
def test_an_absurd_size_is_refused_before_any_work_starts(tmp_path: Path, override: str,
                                                          limit: str) -> None:
    out = tmp_path / "run.arrow"
    result = CliRunner().invoke(main, ["record", "zero-step", "--set", override,
                                       "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and limit in result.stderr
    assert override.split("=")[0] in result.stderr
    assert list(tmp_path.iterdir()) == []  # no trace, no .partial: nothing was started


def test_absurd_but_individually_valid_sizes_are_refused_with_the_limit_named(
        tmp_path: Path) -> None:
    out = tmp_path / "run.arrow"
    result = CliRunner().invoke(main, ["record", "zero-step", "--set", "td.count=64",
                                       "--set", "td.vcpus=1024", "-o", str(out)])
    assert result.exit_code == 2
    assert result.stderr == ("tdxtrace: error: zero-step (built-in): td.count x td.vcpus = "
                             f"65536 vCPUs is above the limit {MAX_TOTAL_VCPUS} "
                             "(lower td.count or td.vcpus)\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("override, expected", [
    ("costs.mem.page.aug=5000", {"mem.page.aug": {"base_ns": 5000.0}}),
    ('costs."mem.page.aug"=5000', {"mem.page.aug": {"base_ns": 5000.0}}),
    ("costs.mem.page.aug.base_ns=7", {"mem.page.aug": {"base_ns": 7.0}}),
    ("costs.vp.enter.jitter=0.5", {"vp.enter": {"jitter": 0.5}}),
    ("costs.kick=300", {"kick": {"base_ns": 300.0}}),
    ("costs.kick.tail_p=0.01", {"kick": {"tail_p": 0.01}}),
])
def test_set_overrides_a_cost_whose_name_has_dots(override: str,
                                                   expected: dict[str, Any]) -> None:
    # Leaf costs are named like the leaf (mem.page.aug): the dots belong to the name.
    assert load_scenario("zero-step", [override]).data["costs"] == expected


def test_set_with_an_unknown_cost_names_it() -> None:
    with pytest.raises(ScenarioError, match=r"costs\.mem\.page\.agu: unknown cost"):
        load_scenario("zero-step", ["costs.mem.page.agu=5"])


@pytest.mark.parametrize("overrides", [
    ["costs.mem.page.aug=5000", "costs.mem.page.aug.jitter=0.5"],
    ["costs.mem.page.aug.jitter=0.5", "costs.mem.page.aug=5000"],
    ['costs."mem.page.aug".jitter=0.5', "costs.mem.page.aug.base_ns=5000"],
])
def test_cost_overrides_combine_field_by_field(overrides: list[str]) -> None:
    # A bare number is the base cost only: it must not drop, or refuse, the other fields.
    assert load_scenario("zero-step", overrides).data["costs"] == {
        "mem.page.aug": {"base_ns": 5000.0, "jitter": 0.5}}
