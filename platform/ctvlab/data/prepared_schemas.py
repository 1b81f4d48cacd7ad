"""Schemas of the prepared dataset (`ctvlab preprocess`): JSON Schemas and Arrow schemas.

- `volumes/<id>.json` (the per-patient sidecar) and `dataset.json`: JSON Schemas.
- `patients.parquet` and `voxels/`: Arrow schemas, exported to `schemas/` as a JSON Schema of one row
  whose properties also carry the Arrow type (`x-arrow-type`) and whose `x-arrow-fields` lists the
  columns in order with their nullability, so teams without pyarrow can still read the contract.

`SCHEMAS` maps each exported file name to its generator; `ctvlab.schemas` writes them all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ctvlab.data.layout import CATEGORY_CODES, MASKS
from ctvlab.study import FEATURES

__all__ = [
    "PATIENT_CLINICAL_FIELDS",
    "SCHEMAS",
    "arrow_schema_json",
    "dataset_json_schema",
    "patients_table_schema",
    "sidecar_json_schema",
]

PATIENT_CLINICAL_FIELDS: tuple[str, ...] = (
    "patient_id", "cohort", "sex", "age", "resection", "progression_type", "pfs_months", "os_months",
)  # fmt: skip

_SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_AFFINE = {
    "type": "array",
    "minItems": 4,
    "maxItems": 4,
    "items": {"type": "array", "minItems": 4, "maxItems": 4, "items": {"type": "number"}},
    "description": "4×4 voxel-to-world affine (mm); voxel (i, j, k) lies at affine @ (i, j, k, 1).",
}
_SHAPE = {
    "type": "array",
    "minItems": 3,
    "maxItems": 3,
    "items": {"type": "integer", "minimum": 1},
    "description": "(X, Y, Z) in voxels.",
}
_NAMES = {"type": "array", "items": {"type": "string"}}
_CATEGORY_CODES = {"type": "object", "const": {str(k): v for k, v in CATEGORY_CODES.items()}}


def _outputs(item: dict[str, Any]) -> dict[str, Any]:
    """The three prepared files of a patient, each described by `item`."""
    return {
        "type": "object",
        "properties": {"features": item, "masks": item, "voxels": item},
        "required": ["features", "masks", "voxels"],
        "additionalProperties": False,
    }


def patients_table_schema():
    """Arrow schema of `patients.parquet`: one row per prepared patient.

    Clinical fields come from the manifest. Voxel counts are on the prepared grid; the lesion is
    T2L ∪ CEL before radiotherapy, the target (NEL ∪ CEL) at both time points within the brain (its
    fraction of the brain is the f of the PCC loss); category counts and `mrsi_coverage` (the fraction
    of ring voxels with MRSI) are within the ring.
    """
    import pyarrow as pa

    def req(name: str, type_: pa.DataType) -> pa.Field:
        return pa.field(name, type_, nullable=False)

    return pa.schema(
        [
            req("patient_id", pa.string()),
            req("cohort", pa.string()),
            req("sex", pa.string()),
            req("age", pa.float64()),
            req("resection", pa.string()),
            req("progression_type", pa.string()),
            req("pfs_months", pa.float64()),
            req("os_months", pa.float64()),
            req("has_mrsi", pa.bool_()),
            req("shape", pa.list_(pa.int32(), 3)),
            req("voxel_mm", pa.float64()),
            req("brain_voxels", pa.int64()),
            req("lesion_voxels", pa.int64()),
            req("lesion_volume_cm3", pa.float64()),
            req("lesion_fraction", pa.float64()),
            req("target_voxels", pa.int64()),
            req("target_fraction", pa.float64()),
            req("ring_voxels", pa.int64()),
            req("n_NAV_NAV", pa.int64()),
            req("n_NAV_NEL", pa.int64()),
            req("n_NAV_CEL", pa.int64()),
            req("n_NEL_CEL", pa.int64()),
            req("mrsi_coverage", pa.float64()),
            req("input_hash", pa.string()),
        ]
    )


def _json_type(type_) -> dict[str, Any]:
    import pyarrow as pa

    if pa.types.is_string(type_) or pa.types.is_large_string(type_):
        return {"type": "string"}
    if pa.types.is_boolean(type_):
        return {"type": "boolean"}
    if pa.types.is_integer(type_):
        return {"type": "integer"}
    if pa.types.is_floating(type_):
        return {"type": "number"}
    if pa.types.is_fixed_size_list(type_):
        n = type_.list_size
        return {"type": "array", "items": _json_type(type_.value_type), "minItems": n, "maxItems": n}
    if pa.types.is_list(type_):
        return {"type": "array", "items": _json_type(type_.value_type)}
    raise TypeError(f"no JSON type for Arrow type {type_}")


def arrow_schema_json(schema, title: str, description: str) -> dict[str, Any]:
    """A JSON Schema of one row of an Arrow table, carrying each column's Arrow type and nullability."""
    props: dict[str, Any] = {}
    for f in schema:
        prop = _json_type(f.type)
        if f.nullable:
            prop["type"] = [prop["type"], "null"]
        props[f.name] = {**prop, "x-arrow-type": str(f.type)}
    return {
        "title": title,
        "description": description,
        "type": "object",
        "properties": props,
        "required": [f.name for f in schema if not f.nullable],
        "additionalProperties": False,
        "x-arrow-fields": [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema],
    }


def _patients_table() -> dict[str, Any]:
    return arrow_schema_json(
        patients_table_schema(),
        "ctvlab prepared patients table (patients.parquet)",
        (patients_table_schema.__doc__ or "").split("\n")[0],
    )


def _voxel_table() -> dict[str, Any]:
    from ctvlab.data.layout import voxel_table_schema

    schema = arrow_schema_json(
        voxel_table_schema(),
        "ctvlab voxel table (voxels/patient_id=<id>/*.parquet)",
        "One row per brain voxel within the ring of the pre-RT T2L; patient_id is the hive partition. "
        "voxel_index is the C-order flat index into the (X, Y, Z) grid of volumes/<id>.npy; features are "
        "null where MRSI is missing.",
    )
    schema["properties"]["category"]["enum"] = [v for k, v in sorted(CATEGORY_CODES.items()) if k > 0]
    return schema


def sidecar_json_schema() -> dict[str, Any]:
    """JSON Schema of `volumes/<id>.json`: written last, its presence marks a complete patient."""
    summary = arrow_schema_json(
        patients_table_schema(), "patient summary", "The patient's row of patients.parquet."
    )
    summary.pop("x-arrow-fields")
    output = {
        "type": "object",
        "properties": {"path": {"type": "string"}, "sha256": _SHA256},
        "required": ["path", "sha256"],
        "additionalProperties": False,
    }
    return {
        "title": "ctvlab prepared patient sidecar (volumes/<id>.json)",
        "description": "Grid, channel names and provenance of one prepared patient. A patient is "
        "complete when this file exists and its input_hash and settings_hash match the current inputs "
        "and settings.",
        "type": "object",
        "properties": {
            "patient_id": {"type": "string"},
            "affine": _AFFINE,
            "spacing_mm": {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0}, "minItems": 3,
                           "maxItems": 3},
            "shape": _SHAPE,
            "features": {**_NAMES, "const": list(FEATURES)},
            "masks": {**_NAMES, "const": list(MASKS)},
            "category_codes": _CATEGORY_CODES,
            "input_hash": _SHA256,
            "settings_hash": _SHA256,
            "settings": {"type": "object"},
            "ctvlab_version": {"type": "string"},
            "has_mrsi": {"type": "boolean"},
            "native_affine": _AFFINE,
            "native_shape": _SHAPE,
            "nav_modes": {
                "type": "object",
                "description": "The NAV mode each normalised map was divided by (raw units).",
                "additionalProperties": {"type": ["number", "null"]},
            },
            "outputs": _outputs(output),
            "summary": summary,
        },
        "required": [
            "patient_id", "affine", "spacing_mm", "shape", "features", "masks", "category_codes",
            "input_hash", "settings_hash", "settings", "ctvlab_version", "has_mrsi", "native_affine",
            "native_shape", "nav_modes", "outputs", "summary",
        ],
        "additionalProperties": False,
    }  # fmt: skip


def dataset_json_schema() -> dict[str, Any]:
    """JSON Schema of `dataset.json`: the digest and provenance of a whole prepared dataset."""
    return {
        "title": "ctvlab prepared dataset (dataset.json)",
        "description": "digest = sha256 over the sorted per-patient (id, input_hash, output sha256s) and "
        "the settings: it changes exactly when a prepared file or a setting does.",
        "type": "object",
        "properties": {
            "ctvlab_version": {"type": "string"},
            "settings": {"type": "object"},
            "settings_hash": _SHA256,
            "digest": _SHA256,
            "patients": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "patient_id": {"type": "string"},
                        "input_hash": _SHA256,
                        "outputs": _outputs(_SHA256),
                    },
                    "required": ["patient_id", "input_hash", "outputs"],
                    "additionalProperties": False,
                },
            },
            "features": {**_NAMES, "const": list(FEATURES)},
            "masks": {**_NAMES, "const": list(MASKS)},
            "category_codes": _CATEGORY_CODES,
            "max_shape": {**_SHAPE, "description": "Element-wise maximum (X, Y, Z) over the patients."},
            "voxel_mm": {"type": "number", "exclusiveMinimum": 0},
        },
        "required": [
            "ctvlab_version", "settings", "settings_hash", "digest", "patients", "features", "masks",
            "category_codes", "max_shape", "voxel_mm",
        ],
        "additionalProperties": False,
    }  # fmt: skip


SCHEMAS: dict[str, Callable[[], dict[str, Any]]] = {
    "prepared_sidecar.schema.json": sidecar_json_schema,
    "prepared_dataset.schema.json": dataset_json_schema,
    "patients_table.schema.json": _patients_table,
    "voxel_table.schema.json": _voxel_table,
}
