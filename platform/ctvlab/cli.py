"""The `ctvlab` command. Each subcommand parses its options and calls one library function.

Heavy libraries (torch, ray, mlflow) are imported inside the functions that need them, so that
`ctvlab --help` answers at once. A `CtvlabError` is printed as a message and exits non-zero; it never
shows a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="ctvlab",
    help="Radiotherapy target definition for glioblastoma from diffusion and metabolic MRI.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Opt = typer.Option


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


@app.command()
def synth(
    out: Annotated[Path | None, Opt("--out", help="Folder to write the cohort into.")] = None,
    patients: Annotated[int | None, Opt("--patients", "-n", help="Number of patients (default 101).")] = None,
    seed: Annotated[int | None, Opt("--seed", help="Random seed (default 0).")] = None,
    null: Annotated[
        bool, Opt("--null", help="Control cohort: diffusion/MRSI ignore hidden infiltration.")
    ] = False,
    report: Annotated[
        Path | None, Opt("--report", help="Print the statistics of an existing cohort.")
    ] = None,
    config: Annotated[Path | None, Opt("--config", help="Study config whose `synth` section to use.")] = None,
) -> None:
    """Generate a synthetic cohort on the MNI152 anatomy, or report on one (--report DIR)."""
    from ctvlab.synth.report import cohort_report, print_report

    if report is not None:
        print_report(cohort_report(report), _console())
        return
    if out is None:
        raise typer.BadParameter("give --out DIR to generate, or --report DIR to report on a cohort")
    from ctvlab.synth.cohort import generate_cohort

    cfg = _study(config).synth
    updates = {k: v for k, v in {"n_patients": patients, "seed": seed}.items() if v is not None}
    if null:
        updates["null"] = True
    cfg = cfg.model_copy(update=updates)
    generate_cohort(out, cfg)
    print_report(cohort_report(out), _console())


@app.command()
def validate(
    cohort: Annotated[Path, typer.Argument(help="Cohort folder holding manifest.csv.")],
    json_out: Annotated[bool, Opt("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check a cohort before any compute: every file loads, grids agree, masks are binary, values sane."""
    from ctvlab.ingest.validate import print_validation, validate_cohort

    report = validate_cohort(cohort)
    if json_out:
        sys.stdout.write(report.model_dump_json(indent=2) + "\n")
    else:
        print_validation(report, _console())
    raise typer.Exit(0 if report.ok else 1)


@app.command()
def schemas(
    out: Annotated[Path, Opt("--out", help="Folder for the JSON Schema files.")] = Path("schemas"),
) -> None:
    """Write the JSON Schemas of the manifest, the configs and the prepared data."""
    from ctvlab.schemas import write_schemas

    for path in write_schemas(out):
        _console().print(f"wrote {path}")


def _study(config: Path | None):
    from ctvlab.config import StudyConfig, load_config

    return load_config(config) if config else StudyConfig()


def main() -> None:
    """Console-script entry point: user errors become one message and a non-zero exit code."""
    from ctvlab.errors import CtvlabError

    try:
        app()
    except CtvlabError as e:
        _console(stderr=True).print(f"[bold red]error:[/] {e}")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        _console(stderr=True).print("[yellow]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
