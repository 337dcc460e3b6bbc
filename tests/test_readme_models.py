"""README's model table lists every spec in models/ once, with its line count, and the configs
tests/test_architectures.py verifies it with (their number, and the largest relative logit error
they measured, within the test's 1e-4)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.configs import FAMILY_CONFIGS

ROOT = Path(__file__).resolve().parents[1]
HEADER = "| spec | lines | Hugging Face class | verified: configs, max rel error | what it exercises |"


def rows() -> dict[str, list[str]]:
    text = (ROOT / "README.md").read_text()
    assert text.count(HEADER) == 1
    table = text[text.index(HEADER):].split("\n\n")[0].splitlines()[2:]
    out: dict[str, list[str]] = {}
    for row in table:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        m = re.fullmatch(r"`models/(\w+)\.kiln`", cells[0])
        assert m, row
        assert m.group(1) not in out, f"{m.group(1)} is listed twice"
        out[m.group(1)] = cells
    return out


def test_every_spec_is_listed_with_its_line_count():
    table = rows()
    specs = {p.stem: p for p in (ROOT / "models").glob("*.kiln")}
    assert set(table) == set(specs)
    for name, path in specs.items():
        assert table[name][1] == str(len(path.read_text().splitlines())), f"{name}: line count"


def test_every_spec_lists_its_verified_configs_and_error():
    for name, cells in rows().items():
        m = re.fullmatch(r"(\d+), (\d\.\de-\d+)", cells[3])
        assert m, f"{name}: {cells[3]!r} is not 'N, X.Ye-Z'"
        configs = [n for n in FAMILY_CONFIGS if n.split("-")[0] == name]
        assert int(m.group(1)) == len(configs) > 0, f"{name}: {len(configs)} configs in tests/configs.py"
        assert float(m.group(2)) <= 1e-4
