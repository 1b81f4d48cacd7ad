"""JSON Schemas of ctvlab's inputs and outputs, generated from the pydantic models.

`schemas/` in the repository holds the generated files so that teams can validate their own manifests
and configs without ctvlab; a test regenerates them and fails when they drift from the models.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ctvlab.atomic import write_text_atomic


def _manifest() -> dict[str, Any]:
    from ctvlab.ingest.manifest import ManifestRow

    schema = ManifestRow.model_json_schema()
    schema["description"] = (
        "One row of manifest.csv. Paths are relative to the cohort folder; MRSI paths may be empty."
    )
    return schema


def _config() -> dict[str, Any]:
    from ctvlab.config import StudyConfig

    return StudyConfig.model_json_schema()


# name -> generator. Later stages register their prepared-data schemas here.
GENERATORS: dict[str, Callable[[], dict[str, Any]]] = {
    "manifest.schema.json": _manifest,
    "config.schema.json": _config,
}


def _register_optional() -> None:
    try:
        from ctvlab.data.schemas import SCHEMAS  # prepared-data schemas, when present
    except ImportError:
        return
    GENERATORS.update(SCHEMAS)


def render_all() -> dict[str, str]:
    """File name -> JSON text of every schema."""
    _register_optional()
    out = {}
    for name, gen in sorted(GENERATORS.items()):
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **gen()}
        out[name] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def write_schemas(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    written = []
    for name, text in render_all().items():
        path = folder / name
        write_text_atomic(path, text)
        written.append(path)
    return written
