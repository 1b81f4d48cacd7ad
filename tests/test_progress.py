"""Progress lines of long work: in a log, one line per step with the count and what the step gave."""

from __future__ import annotations

import io

from ctvlab.progress import StepProgress


def test_off_a_terminal_each_step_is_one_line_with_its_count():
    log = io.StringIO()
    with StepProgress("rf CV", 3, stream=log) as p:
        p.step("nel/all fold 0: AUC 0.810")
        p.step("nel/all fold 1: AUC 0.790")
    lines = log.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("rf CV [1/3, ") and lines[0].endswith("nel/all fold 0: AUC 0.810")
    assert lines[1].startswith("rf CV [2/3, ")
