"""The files in schemas/ are what `tdxtrace schema --export` writes from the code, byte for byte."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from tdxtrace.commands.schema_cmd import ARROW_FILE, TEXT_FILE, export_schema
from tdxtrace.errors import OutputError
from tdxtrace.schema import (
    COLUMN_NAMES,
    META_FORMAT,
    META_POLICIES,
    META_PRODUCER,
    META_SCENARIO,
    META_SCENARIO_NAME,
    META_SCHEMA_VERSION,
    META_SEED,
    META_VERSION,
    SUMMARY_DIGEST,
    SUMMARY_EVENTS,
    SUMMARY_TRUTH,
    arrow_schema,
    schema_text,
)

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"
REGENERATE = "regenerate with: tdxtrace schema --export schemas/"


def test_text_export_matches_the_code() -> None:
    assert (SCHEMAS / TEXT_FILE).read_text(encoding="utf-8") == schema_text(), REGENERATE


def test_arrow_export_matches_the_code_including_field_docs() -> None:
    exported = ipc.read_schema(pa.py_buffer((SCHEMAS / ARROW_FILE).read_bytes()))
    assert exported.equals(arrow_schema(), check_metadata=True), REGENERATE
    assert exported.names == list(COLUMN_NAMES)
    assert exported.field("ts_ns").metadata[b"unit"] == b"ns"


def test_export_writes_both_files_atomically(tmp_path: Path) -> None:
    written = export_schema(tmp_path / "out")
    assert [p.name for p in written] == [TEXT_FILE, ARROW_FILE]
    for path in written:
        assert path.read_bytes() == (SCHEMAS / path.name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([TEXT_FILE, ARROW_FILE])


def test_export_into_a_file_is_an_output_error(tmp_path: Path) -> None:
    blocker = tmp_path / "schemas"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match=f"^{blocker}: not a folder$"):
        export_schema(blocker)


def test_readme_documents_every_metadata_and_summary_key() -> None:
    readme = (SCHEMAS / "README.md").read_text(encoding="utf-8")
    keys = [META_FORMAT, META_SCHEMA_VERSION, META_VERSION, META_PRODUCER, META_SCENARIO_NAME,
            META_SCENARIO, META_SEED, META_POLICIES, SUMMARY_EVENTS, SUMMARY_DIGEST,
            SUMMARY_TRUTH]
    assert [key for key in keys if f"`{key}`" not in readme] == []


def test_every_sub_code_is_named_in_the_text_and_the_json() -> None:
    # A reader of a trace must be able to decode `sub` without the Python sources.
    from tdxtrace.commands.schema_cmd import schema_json
    from tdxtrace.events import SUB_ENUMS

    text, doc = schema_text(), schema_json()
    for kind, enum in SUB_ENUMS.items():
        line = next(ln for ln in text.splitlines() if ln.startswith(f"{kind.name}: 1 ")
                    or ln.startswith(f"{kind.name}: 0 "))
        for member in enum:
            assert f"{int(member)} {member.name}" in line, (kind.name, member.name)
            assert doc["sub_codes"][kind.name][str(int(member))] == member.name
    assert doc["sub_codes"]["FAULT_RETRY"]["4"] == "STALE"
    assert doc["sub_codes"]["KICK"]["5"] == "TLB_FLUSH"
