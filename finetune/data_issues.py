"""What the data loaders repaired, skipped or left out, so a run can report it in result.json.

The loaders never change data silently: every repair or skip is counted here (and logged), and the
run writes `data_issues` into its result.json when anything was counted.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class DataIssues:
    # file -> malformed train/dev rows skipped (only under skip_malformed_rows)
    skipped_rows: dict[str, int] = field(default_factory=dict)
    # test file -> rows with a wrong field count kept (so they reach the submission), fields mended
    repaired_test_rows: dict[str, int] = field(default_factory=dict)
    # SQuAD file -> answers whose answer_start was moved to the nearby occurrence of their text
    answer_start_repairs: dict[str, int] = field(default_factory=dict)
    # anything else a user should know (e.g. why AX.tsv was not written)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v}
