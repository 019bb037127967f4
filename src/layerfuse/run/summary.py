"""`RunSummary`: what a run did, row by row counted, and its report.

>>> from pathlib import Path
>>> summary = RunSummary(Path("out.parquet"), Path("out.rejects.jsonl"), rows=10, written=8, truncated=1,
...                      max_length=128, rejected={"empty text": 2}, resumed=0, seconds=2.0, normalize=True)
>>> print(summary.report())
wrote 8 of 10 rows to out.parquet in 2.0 s (5.0 rows/s)
embeddings: mean pooling, L2-normalised, at most 128 tokens
rejected 2 rows (2 empty text), listed in out.rejects.jsonl
truncated 1 row to 128 tokens
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .tables import NONFINITE


def _rows(count: int) -> str:
    return f"{count} row{'' if count == 1 else 's'}"


@dataclass(frozen=True)
class RunSummary:
    """Corpus `rows`, rows `written`, rows `truncated` to `max_length` tokens, rejects by reason, timing,
    and how the embeddings were made: their `pooling` and whether they were L2-normalised.

    `resumed` rows were done by an earlier, interrupted run; `seconds` is this run's time.
    """

    output: Path
    rejects: Path
    rows: int
    written: int
    truncated: int
    max_length: int
    rejected: dict[str, int]
    resumed: int
    seconds: float
    pooling: str = "mean"
    normalize: bool = False

    @property
    def nonfinite(self) -> int:
        """Rows whose embedding held NaN or infinity, rejected instead of written."""
        return self.rejected.get(NONFINITE, 0)

    @property
    def rows_per_second(self) -> float:
        """Rows this run went through, per second."""
        return (self.rows - self.resumed) / self.seconds if self.seconds > 0 else 0.0

    def report(self) -> str:
        """A few lines for the terminal."""
        lines = [
            f"wrote {self.written} of {_rows(self.rows)} to {self.output} in {self.seconds:.1f} s "
            f"({self.rows_per_second:.1f} rows/s)" + (f", resuming after row {self.resumed}" if self.resumed else "")
        ]
        made = "each real token's state" if self.pooling == "none" else f"{self.pooling} pooling"
        lines.append(
            f"embeddings: {made}{', L2-normalised' if self.normalize else ''}, at most {self.max_length} tokens"
        )
        total = sum(self.rejected.values())
        if total:
            reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.rejected.items()))
            lines.append(f"rejected {_rows(total)} ({reasons}), listed in {self.rejects}")
        if self.truncated:
            lines.append(f"truncated {_rows(self.truncated)} to {self.max_length} tokens")
        if self.nonfinite:
            lines.append(
                f"warning: {_rows(self.nonfinite)} gave NaN or infinite embeddings and were not written: "
                "check the info and the method's arguments"
            )
        return "\n".join(lines)
