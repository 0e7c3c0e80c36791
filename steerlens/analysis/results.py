"""What a study returns: its tables and figures by name, kept in memory until `save` writes them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from steerlens.io import write_text


@dataclass
class StudyResult:
    """A study's pandas tables and plotly figures, each under the file name it is saved as."""

    tables: dict[str, pd.DataFrame]
    figures: dict[str, go.Figure] = field(default_factory=dict)

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write each table as CSV (with its index) and each figure as standalone HTML into `out_dir`, atomically."""
        out_dir = Path(out_dir)
        written = []
        for name, table in self.tables.items():
            written.append(out_dir / f"{name}.csv")
            write_text(written[-1], table.to_csv())
        for name, figure in self.figures.items():
            written.append(out_dir / f"{name}.html")
            write_text(written[-1], figure.to_html(include_plotlyjs="cdn"))
        return written
