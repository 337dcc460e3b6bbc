"""Published figures of the engines Kiln is measured against, for `kiln bench throughput --sweep`.

The figures are data (configs/trtllm-perf-overview.json: TensorRT-LLM's perf-overview, each as
its source states it, with that source); this module reads them and lays out the comparison.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SWEEP_SHAPES = ((128, 128), (128, 2048), (500, 2000), (1000, 1000), (2048, 128), (2048, 2048))
CARDS = ("H200", "H100", "A100")


@dataclass(frozen=True)
class PeerFigure:
    tok_s: int
    card: str
    precision: str

    def __str__(self) -> str:
        return f"{self.tok_s:,} ({self.precision})"


@dataclass(frozen=True)
class PeerTable:
    source: str
    model_config: str  # the config whose shape the figures are for
    figures: dict[tuple[int, int], list[PeerFigure]]

    def peers(self, card: str | None, shape: tuple[int, int]) -> list[PeerFigure]:
        return [f for f in self.figures.get(shape, []) if f.card == card]


def load(path: str | Path) -> PeerTable:
    raw = json.loads(Path(path).read_text())
    figures: dict[tuple[int, int], list[PeerFigure]] = {}
    for shape, row in raw["figures"].items():
        isl, osl = (int(x) for x in shape.split("/"))
        for key, v in sorted(row.items()):
            card, precision = key.split()
            figures.setdefault((isl, osl), []).append(PeerFigure(int(v), card, precision))
    return PeerTable(raw["source"], raw["model_config"], figures)


def card_of(device_name: str) -> str | None:
    """'NVIDIA H200' -> 'H200'; None for a card with no published column."""
    return next((c for c in CARDS if c in device_name), None)


def sweep_table(table: PeerTable, card: str | None, kiln: dict[tuple[int, int], float], precision: str) -> str:
    """A markdown table: each shape, Kiln's output tok/s, and the peer's figures with ratios."""
    lines = [f"| ISL/OSL | Kiln ({precision}) | TensorRT-LLM, {card or 'no published card'} | Kiln / peer |",
             "| --- | ---: | ---: | ---: |"]
    for shape, ours in kiln.items():
        found = table.peers(card, shape)
        theirs = ", ".join(map(str, found)) or "-"
        ratio = ", ".join(f"{ours / p.tok_s:.2f}x vs {p.precision}" for p in found) or "-"
        lines.append(f"| {shape[0]}/{shape[1]} | {ours:,.0f} | {theirs} | {ratio} |")
    lines.append(f"\nsource: {table.source}")
    return "\n".join(lines)
