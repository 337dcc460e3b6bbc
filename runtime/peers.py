"""Published figures of the engines Kiln is measured against, for `kiln bench throughput --sweep`.

TensorRT-LLM's perf-overview (NVIDIA/TensorRT-LLM docs/source/performance/perf-overview.md):
Llama 3.1 8B, TP1, total output tokens/s at maximum load (`trtllm-bench`), FP8 columns from v1.0,
FP16 from v0.14. Each figure is as the source states it; the precision goes beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

SOURCE = "TensorRT-LLM perf-overview, Llama 3.1 8B TP1 (v1.0 FP8, v0.14 FP16)"

# (input length, output length) -> {(card, precision): output tok/s}
TRTLLM_LLAMA31_8B: dict[tuple[int, int], dict[tuple[str, str], int]] = {
    (128, 128): {("H200", "fp8"): 27911, ("H100", "fp8"): 28312, ("H100", "fp16"): 15572, ("A100", "fp16"): 6702},
    (128, 2048): {("H200", "fp8"): 26221, ("H100", "fp8"): 22714, ("H100", "fp16"): 9151, ("A100", "fp16"): 4963},
    (500, 2000): {("H200", "fp8"): 20770, ("H100", "fp8"): 17660, ("H100", "fp16"): 7498, ("A100", "fp16"): 3945},
    (1000, 1000): {("H200", "fp8"): 17744, ("H100", "fp8"): 15220, ("H100", "fp16"): 7055, ("A100", "fp16"): 3634},
    (2048, 128): {("H200", "fp8"): 3538, ("H100", "fp8"): 3450, ("H100", "fp16"): 1904, ("A100", "fp16"): 795},
    (2048, 2048): {("H200", "fp8"): 12194, ("H100", "fp8"): 9305, ("H100", "fp16"): 4160, ("A100", "fp16"): 2265},
}
SWEEP_SHAPES = ((128, 128), (128, 2048), (500, 2000), (1000, 1000), (2048, 128), (2048, 2048))


def card_of(device_name: str) -> str | None:
    """'NVIDIA H200' -> 'H200'; None for a card with no published column."""
    for card in ("H200", "H100", "A100"):
        if card in device_name:
            return card
    return None


@dataclass(frozen=True)
class PeerFigure:
    tok_s: int
    precision: str

    def __str__(self) -> str:
        return f"{self.tok_s:,} ({self.precision})"


def peers(card: str | None, shape: tuple[int, int]) -> list[PeerFigure]:
    """TensorRT-LLM's published figures for this card and shape, every precision published."""
    row = TRTLLM_LLAMA31_8B.get(shape, {})
    return [PeerFigure(v, prec) for (c, prec), v in sorted(row.items()) if c == card]


def sweep_table(card: str | None, kiln: dict[tuple[int, int], float], precision: str) -> str:
    """A markdown table: each shape, Kiln's output tok/s, and TensorRT-LLM's figures with ratios."""
    lines = [f"| ISL/OSL | Kiln ({precision}) | TensorRT-LLM {card or '(no published card)'} | Kiln / peer |",
             "| --- | ---: | ---: | ---: |"]
    for shape, ours in kiln.items():
        found = peers(card, shape)
        theirs = ", ".join(map(str, found)) or "-"
        ratio = ", ".join(f"{ours / p.tok_s:.2f}x vs {p.precision}" for p in found) or "-"
        lines.append(f"| {shape[0]}/{shape[1]} | {ours:,.0f} | {theirs} | {ratio} |")
    lines.append(f"\nsource: {SOURCE}")
    return "\n".join(lines)
