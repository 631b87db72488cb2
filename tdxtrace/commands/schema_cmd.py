"""``tdxtrace schema``: print the trace format, or export it for readers in other languages.

The files in the repository's ``schemas/`` folder are written by ``tdxtrace schema --export
schemas/``; a test fails when they drift from :mod:`tdxtrace.schema`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from tdxtrace.commands.options import path_param
from tdxtrace.errors import OutputError
from tdxtrace.events import TRUTH_KIND_BASE, Kind
from tdxtrace.outputs import write_output
from tdxtrace.schema import (
    FIELDS,
    FORMAT_NAME,
    KIND_ARGS,
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
    arrow_schema,
    schema_text,
    sub_codes,
)

TEXT_FILE = f"trace-v{SCHEMA_VERSION}.txt"
ARROW_FILE = f"trace-v{SCHEMA_VERSION}.arrow-schema"


def schema_json() -> dict[str, Any]:
    """The schema as JSON-able data: columns, kinds, sub-codes, metadata and summary keys."""
    return {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "columns": [
            {"name": f.name, "type": str(f.type), "nullable": f.nullable, "unit": f.unit,
             "doc": f.doc}
            for f in FIELDS
        ],
        "kinds": [
            {"value": int(kind), "name": kind.name, "truth": kind >= TRUTH_KIND_BASE,
             "columns": KIND_ARGS[kind.name]}
            for kind in Kind
        ],
        "sub_codes": {kind: {str(value): name for value, name in codes.items()}
                      for kind, codes in sub_codes().items()},
        "metadata_keys": [META_FORMAT, META_SCHEMA_VERSION, META_VERSION, META_PRODUCER,
                          META_SCENARIO_NAME, META_SCENARIO, META_SEED, META_POLICIES],
        "summary_keys": [SUMMARY_EVENTS, SUMMARY_DIGEST, SUMMARY_TRUTH],
    }


def export_schema(folder: Path) -> list[Path]:
    """Write ``trace-v1.txt`` and ``trace-v1.arrow-schema`` (serialized Arrow schema)."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{folder}: cannot create folder: {err.strerror or err}") from None
    outputs = {
        folder / TEXT_FILE: schema_text().encode(),
        folder / ARROW_FILE: arrow_schema().serialize().to_pybytes(),
    }
    for path, data in outputs.items():
        write_output(path, data, force=True)  # regenerating overwrites, but only regular files
    return list(outputs)


@click.command(
    "schema",
    epilog="""\b
Examples:
  tdxtrace schema                    the columns, kinds and metadata keys
  tdxtrace schema --json             the same as JSON
  tdxtrace schema --export schemas/  write trace-v1.txt and trace-v1.arrow-schema""",
)
@click.option("--json", "as_json", is_flag=True, help="Print the schema as JSON.")
@click.option("--export", "export_dir", metavar="DIR",
              type=path_param(),
              help="Write the schema files (text and serialized Arrow schema) into DIR.")
def schema_command(as_json: bool, export_dir: Path | None) -> None:
    """Show trace format v1: every column with its type, unit and meaning, every event kind."""
    if export_dir is not None:
        for path in export_schema(export_dir):
            click.echo(f"wrote {path}")
        return
    if as_json:
        click.echo(json.dumps(schema_json(), indent=2))
    else:
        click.echo(schema_text(), nl=False)
