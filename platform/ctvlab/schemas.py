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


def _series_map() -> dict[str, Any]:
    from ctvlab.dicom.importer import SeriesMap

    schema = SeriesMap.model_json_schema()
    schema["description"] = (
        "The series map of `ctvlab import-dicom --series` (YAML); example: jobs/series.yaml."
    )
    return schema


def generators() -> dict[str, Callable[[], dict[str, Any]]]:
    """File name -> the function that builds that schema."""
    from ctvlab.ctv.tables import TABLES, row_schema  # the evaluation's coverage tables
    from ctvlab.data.prepared_schemas import SCHEMAS  # the prepared dataset's files

    tables = {f"evaluate_{name.removesuffix('.csv')}.schema.json": (lambda m=model: row_schema(m))
              for name, model in TABLES.items()}  # fmt: skip
    return {"manifest.schema.json": _manifest, "config.schema.json": _config,
            "series_map.schema.json": _series_map, **SCHEMAS, **tables}  # fmt: skip


def render_all() -> dict[str, str]:
    """File name -> JSON text of every schema."""
    out = {}
    for name, gen in sorted(generators().items()):
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
