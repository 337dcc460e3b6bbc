"""load_spec: file -> parse -> resolve `extends` -> lower -> ir.Spec.

Specs are found by path, or by name in the spec's own folder and then in Kiln's
`models/` folder (so `extends base` finds `models/base.kiln`).
"""

from __future__ import annotations

from pathlib import Path

from . import ir
from .errors import SpecError
from .lower import lower, merge
from .syntax import SpecAst, parse_text

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


def find_spec(name: str, near: Path | None = None) -> Path | None:
    for folder in ([near] if near else []) + [MODELS_DIR]:
        p = folder / f"{name}.kiln"
        if p.is_file():
            return p
    return None


def load_spec(path: str | Path) -> ir.Spec:
    p = Path(path)
    if not p.suffix and not p.exists():
        found = find_spec(str(path))
        if found is None:
            raise SpecError(f"no spec named '{path}'", None,
                            f"specs in {MODELS_DIR}: " + ", ".join(sorted(x.stem for x in MODELS_DIR.glob('*.kiln'))))
        p = found
    if not p.is_file():
        raise SpecError(f"spec file not found: {p}")
    ast, files = _load_ast(p, ())
    return lower(ast, files, tuple((f, Path(f).read_text(encoding="utf-8")) for f in files))


def parse_spec(text: str, file: str = "<string>") -> ir.Spec:
    """A spec given as text (tests, tools); `extends` looks in models/."""
    try:
        ast = parse_text(text, file)
        files: tuple[str, ...] = (file,)
        if ast.extends:
            base_path = find_spec(ast.extends)
            if base_path is None:
                raise SpecError(f"spec '{ast.extends}' to extend was not found", ast.pos)
            base, base_files = _load_ast(base_path, (file,))
            ast, files = merge(base, ast), (file,) + base_files
        sources = ((file, text),) + tuple((f, Path(f).read_text(encoding="utf-8")) for f in files[1:])
        return lower(ast, files, sources)
    except SpecError as e:
        if e.pos is not None and e.pos.file == file:
            raise e.with_source(text) from None
        raise


def _load_ast(p: Path, chain: tuple[str, ...]) -> tuple[SpecAst, tuple[str, ...]]:
    key = str(p.resolve())
    if key in chain:
        raise SpecError("specs extend each other in a cycle: " + " -> ".join(chain + (key,)))
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"cannot read spec {p}: {e}") from None
    ast = parse_text(text, str(p))
    files = (str(p),)
    if ast.extends:
        base_path = find_spec(ast.extends, p.parent)
        if base_path is None:
            raise SpecError(f"spec '{ast.extends}' to extend was not found", ast.pos,
                            f"looked for {ast.extends}.kiln in {p.parent} and {MODELS_DIR}")
        base, base_files = _load_ast(base_path, chain + (key,))
        ast = merge(base, ast)
        files += base_files
    return ast, files
