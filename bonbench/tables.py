"""Result tables on disk: each DataFrame as ``<name>.parquet`` and ``<name>.csv``, the summary
also as a Markdown table. The one home for how every command (measure, evals) writes its tables."""

from __future__ import annotations

import math
from pathlib import Path


def to_markdown(frame, digits: int = 4) -> str:
    """A GitHub Markdown table (pandas' own ``to_markdown`` needs ``tabulate``); NaN cells are empty."""
    def cell(value) -> str:
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.{digits}f}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(str(c) for c in frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def write_tables(folder: Path, tables: dict) -> None:
    """Each DataFrame of ``tables`` as ``<name>.parquet`` and ``<name>.csv`` in ``folder``; the one
    named ``summary`` also as ``summary.md``, where a ``note`` column is written as a bold line
    under the table rather than in it."""
    folder = Path(folder)
    for name, frame in tables.items():
        frame.to_parquet(folder / f"{name}.parquet", index=False)
        frame.to_csv(folder / f"{name}.csv", index=False)
    if "summary" in tables:
        summary = tables["summary"]
        notes = sorted({n for n in summary["note"] if n}) if "note" in summary else []
        text = to_markdown(summary.drop(columns=["note"], errors="ignore")) + "\n"
        (folder / "summary.md").write_text(text + "".join(f"\n**{n}**\n" for n in notes))
