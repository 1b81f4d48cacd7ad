"""The validation report: what is wrong, where, how to fix it; printed one line per problem."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field, computed_field

from ctvlab.ingest.manifest import (
    MANIFEST_NAME,
    ManifestRow,
)

if TYPE_CHECKING:
    from rich.console import Console

Severity = Literal["error", "warning"]

# --- report --------------------------------------------------------------------------------------


class Problem(BaseModel):
    """One thing wrong with a cohort, a patient or one of its files."""

    patient_id: str | None
    column: str | None  # manifest column / file role, e.g. "flair"
    path: str | None  # as written in the manifest (relative to the cohort folder)
    message: str  # what is wrong
    fix: str  # how to fix it
    severity: Severity = "error"


class PatientResult(BaseModel):
    """The verdict on one manifest row: valid when none of its problems is an error."""

    patient_id: str
    line: int | None  # 1-based line in manifest.csv
    has_mrsi: bool
    problems: list[Problem]
    # For the cohort-wide checks only (never printed): content digest and resolved path of each file read,
    # and the paths as the manifest wrote them.
    file_digests: dict[str, str] = Field(default_factory=dict, exclude=True)
    resolved_paths: dict[str, str] = Field(default_factory=dict, exclude=True)
    manifest_paths: dict[str, str] = Field(default_factory=dict, exclude=True)

    @computed_field
    @property
    def valid(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)


class ValidationReport(BaseModel):
    """Every patient's verdict plus the problems of the cohort as a whole (e.g. no manifest)."""

    root: str
    patients: list[PatientResult]
    cohort_problems: list[Problem]
    # What preprocessing works from (never printed): the rows that parsed, and every row's id in file order.
    rows: list[ManifestRow] = Field(default_factory=list, exclude=True)
    manifest_ids: list[str] = Field(default_factory=list, exclude=True)

    @computed_field
    @property
    def n_valid(self) -> int:
        return sum(p.valid for p in self.patients)

    @computed_field
    @property
    def n_invalid(self) -> int:
        return len(self.patients) - self.n_valid

    @computed_field
    @property
    def n_warnings(self) -> int:
        return sum(p.severity == "warning" for p in self.problems())

    @computed_field
    @property
    def ok(self) -> bool:
        """True only when there is no error at all, neither cohort-level nor in any patient."""
        return not any(p.severity == "error" for p in self.problems())

    def valid_ids(self) -> list[str]:
        return [p.patient_id for p in self.patients if p.valid]

    def problems(self) -> list[Problem]:
        return [*self.cohort_problems, *(q for p in self.patients for q in p.problems)]


# --- printing ----------------------------------------------------------------------------------------


def format_problem(p: Problem) -> str:
    """`patient · file · what is wrong · how to fix`, plain text."""
    who = p.patient_id or "cohort"
    where = p.path or "-"
    if p.column and p.path != MANIFEST_NAME:
        where = f"{where} ({p.column})"
    return f"{who} · {where} · {p.message} · {p.fix}"


def print_validation(report: ValidationReport, console: Console) -> None:
    """One line per problem, then the summary `N valid, M invalid`. Lines never wrap, so grep works."""
    from rich.text import Text

    for p in report.problems():
        style = "bold red" if p.severity == "error" else "yellow"
        console.print(Text.assemble((f"{p.severity:<7} ", style), format_problem(p)), soft_wrap=True)
    summary = f"{report.n_valid} valid, {report.n_invalid} invalid"
    if report.n_warnings:
        summary += f", {report.n_warnings} warning{'s' if report.n_warnings != 1 else ''}"
    if report.cohort_problems:
        n = sum(p.severity == "error" for p in report.cohort_problems)
        summary += f"; {n} cohort-level error{'s' if n != 1 else ''}"
    console.print(Text(summary, style="bold green" if report.ok else "bold red"), soft_wrap=True)
