"""A trained model leaves a stage as an MLflow model (`ctvlab.unet.pyfunc`), registered with its provenance
as tags, a registry alias (`candidate` for a search's or a training run's best, `champion` for the study's
evaluated model) and a model card as the version's description."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from ctvlab.config import StudyConfig

CANDIDATE = "candidate"
CHAMPION = "champion"
PROVENANCE_TAGS = ("dataset_digest", "split_digest", "salt_fingerprint")
DISCLAIMER = "Research use only. Not a medical device; not for clinical decisions."


def log_model(logger, model_dir: str | Path, artifact_path: str = "model") -> None:
    """Log a model folder to the run as an MLflow pyfunc model under `artifact_path`."""
    from ctvlab.unet.pyfunc import save_pyfunc

    with tempfile.TemporaryDirectory() as d:
        logger.artifact(save_pyfunc(model_dir, Path(d) / "model"), artifact_path)


def register(tracker, cfg: StudyConfig, run_id: str, spec: dict[str, Any], extra_tags: dict[str, str] | None = None,
             artifact_path: str = "model", alias: str | None = CANDIDATE):  # fmt: skip
    """Register the run's logged model; tag it with its provenance, point `alias` at it, write its card, tag the
    run with the version's URI. Returns the version, or None while the tracking server is away (the
    registration is then sent with the rest of the spool)."""
    name = cfg.unet.registered_model_name
    tags = {k: str(spec[k]) for k in PROVENANCE_TAGS if spec.get(k)}
    # One write: the version, its alias, its card and the run's tag naming it, kept whole (and None
    # returned) while the tracking server is away.
    return tracker.register(name, run_id, artifact_path, tags={**tags, **(extra_tags or {})}, alias=alias,
                            description=model_card(cfg, spec, run_id))  # fmt: skip


def model_card(cfg: StudyConfig, spec: dict[str, Any], run_id: str, evaluation=None,
               evaluation_url: str | None = None) -> str:  # fmt: skip
    """The registered version's description (Markdown): what the model is, what it was trained on, how it
    did on the test patients beside the study (with a link to the evaluation's run page, `evaluation_url`),
    what it is for and what it is not for."""
    from ctvlab.stages.evaluate import STUDY_RESULTS

    lines = [
        f"# {cfg.unet.registered_model_name}: 3D U-Net for the clinical target volume of glioblastoma",
        "",
        f"**{DISCLAIMER}**",
        "",
        "## Model",
        f"- inputs: {spec.get('modality_set')} ({spec.get('in_channels')} channels"
        + (f": {', '.join(spec['channels'])}" if spec.get("channels") else "") + "), 3 mm grid "
        + f"{spec.get('input_shape')}; output: per-voxel probability of progression",
        f"- network: {spec.get('architecture')} with {spec.get('base_features')} base features, "
        f"{spec.get('norm')} normalisation; model CTV threshold {spec.get('threshold', 'chosen at evaluation')}",
        f"- training run: `{run_id}` (MLflow); study `{cfg.name}`",
        "",
        "## Data",
        f"- prepared dataset digest `{spec.get('dataset_digest', '?')}`, split digest `{spec.get('split_digest', '?')}`,"
        f" pseudonym-salt fingerprint `{spec.get('salt_fingerprint', '?')}`",
        f"- {len(spec.get('train_patients', []))} training and {len(spec.get('val_patients', []))} validation "
        "patients (pseudonyms in the model's spec); evaluation refuses a model whose digests differ from its data",
    ]  # fmt: skip
    if evaluation is not None:  # first under the title: the run that evaluated (and crowned) this version
        run = f"[{evaluation.run_id}]({evaluation_url})" if evaluation_url else f"`{evaluation.run_id}`"
        lines[4:4] = [f"Evaluated on the test patients by run {run}: its figures, tables and the study's report "
                      "are under that run's Artifacts.", ""]  # fmt: skip
        lines += ["", f"## Test patients ({evaluation.per_patient['patient_id'].nunique()}), mean ± SD "
                  "[the study's value]", "", "| CTV | sensitivity | specificity | PCC |", "|---|---|---|---|"]  # fmt: skip
        for r in evaluation.summary.to_dict("records"):
            cells = []
            for m in ("sensitivity", "specificity", "pcc"):
                ref = STUDY_RESULTS.get(r["ctv"], {}).get(m)
                cells.append(
                    f"{r[f'{m}_mean']:.2f} ± {r[f'{m}_sd']:.2f}" + (f" [{ref[0]:.2f}]" if ref else "")
                )
            lines.append(f"| {r['ctv']} | {' | '.join(cells)} |")
    lines += [
        "",
        "## Intended use",
        "Research on radiotherapy target definition from pre-radiotherapy diffusion and metabolic MRI "
        "(Tran et al., npj Digital Medicine 2025), on cohorts prepared by ctvlab's preprocessing.",
        "",
        "## Limitations",
        "- Trained on the cohort above only (a synthetic cohort unless the study says otherwise); not "
        "validated on other scanners, protocols or institutions.",
        "- Needs co-registered T1c, FLAIR, ADC, FA and MRSI inputs as ctvlab prepares them; missing MRSI is "
        "filled as in training, which lowers sensitivity.",
        "- The CTV is a region where progression is likely, not a dose prescription.",
    ]
    return "\n".join(lines)


EVALUATION_RUN_TAG = "ctvlab.evaluation_run"  # on the crowned version: the run that evaluated it
CROWNED_TAG = "ctvlab.champion_version"  # on that evaluation run: the version it crowned


def crown(tracker, cfg: StudyConfig, model_uri: str, evaluation) -> str | None:
    """After the study's evaluation: point the `champion` alias at the evaluated registered version, add the
    test results to its card with a link to the evaluation run, and tag each with the other (the version
    with `ctvlab.evaluation_run`, the run with `ctvlab.champion_version`). Returns the version, or None when
    the model is not a registered one."""
    from ctvlab.unet.inference import SPEC_FILE, model_folder

    if not model_uri or not model_uri.startswith("models:/"):
        return None
    name, _, number = model_uri[len("models:/") :].partition("/")
    if not tracker.reachable() and number.isdigit() and getattr(evaluation, "model_spec", None):
        # The store is away: the version is in the URI and the spec is the evaluated model's own; the alias
        # and the card wait in the spool with the evaluation's run.
        spec = evaluation.model_spec
        tracker.set_alias(name, CHAMPION, number)
        card = model_card(
            cfg, spec, spec.get("mlflow_run_id", "?"), evaluation, tracker.run_url(evaluation.run_id)
        )
        tracker.describe_version(name, number, card)
        _link(tracker, name, number, evaluation.run_id)
        return number
    version = tracker.model_version(model_uri)
    with tempfile.TemporaryDirectory() as d:
        spec = json.loads((model_folder(tracker.download_model(model_uri, d)) / SPEC_FILE).read_text())
    tracker.set_alias(version.name, CHAMPION, version.version)
    card = model_card(cfg, spec, version.run_id, evaluation, tracker.run_url(evaluation.run_id))
    tracker.describe_version(version.name, version.version, card)
    _link(tracker, version.name, str(version.version), evaluation.run_id)
    return str(version.version)


def _link(tracker, name: str, version: str, evaluation_run_id: str) -> None:
    """The crowned version and the evaluation run that crowned it, each tagged with the other."""
    tracker.tag_version(name, version, {EVALUATION_RUN_TAG: evaluation_run_id})
    tracker.logger(evaluation_run_id).tags({CROWNED_TAG: f"models:/{name}/{version}"})
