"""load_spec: file -> parse -> resolve `extends` -> lower -> ir.Spec.

Specs are found by path, or by name in the spec's own folder and then among the specs Kiln
ships (so `extends base` finds `models/base.kiln`). The shipped specs are the package data of
`kiln.models` (the checkout's models/ folder, mapped in pyproject.toml), read through
importlib.resources so an editable install and a wheel find them alike.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from . import ir
from .errors import SpecError
from .lower import lower, merge
from .syntax import SpecAst, parse_text

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

SPEC_PACKAGE = "kiln.models"
SPEC_SUFFIX = ".kiln"
_CHECKOUT = Path(__file__).resolve().parent.parent  # the checkout's root, in an editable install


def package_files(package: str) -> Traversable:
    """`importlib.resources.files(package)` for Kiln's data packages (kiln.models, kiln.templates).

    setuptools' editable install cannot import a namespace package nested in a mapped regular
    package (pypa/setuptools#4943: `import kiln.models` fails after `pip install -e .`), so there
    the checkout's folder of that name (models/, templates/: pyproject.toml's package-dir) is read.
    """
    try:
        return resources.files(package)
    except ModuleNotFoundError:
        folder = _CHECKOUT / package.rpartition(".")[2]
        if folder.is_dir():
            return folder
        raise RuntimeError(f"Kiln is installed without its package {package}: reinstall it") from None


def _models_dir() -> Path:
    """The folder on disk that holds the shipped specs."""
    found = [t for t in package_files(SPEC_PACKAGE).iterdir() if t.name.endswith(SPEC_SUFFIX) and t.is_file()]
    if not found:
        raise RuntimeError(f"Kiln is installed without its specs: {SPEC_PACKAGE} holds no *{SPEC_SUFFIX} file")
    folders = {t.parent for t in found if isinstance(t, Path)}
    if len(folders) == 1 and all(isinstance(t, Path) for t in found):
        return folders.pop()
    # Not plain files in one folder (a zip import, or the namespace package split over folders):
    # specs name each other by file (`extends`), so lay them out in one folder of their own.
    tmp = Path(tempfile.mkdtemp(prefix="kiln-models-"))
    atexit.register(shutil.rmtree, tmp, True)
    for t in found:
        (tmp / t.name).write_bytes(t.read_bytes())
    return tmp


MODELS_DIR: Path = _models_dir()


def spec_files() -> list[Path]:
    """The spec files Kiln ships (models/*.kiln), sorted by name."""
    return sorted(MODELS_DIR.glob(f"*{SPEC_SUFFIX}"))


def find_spec(name: str, near: Path | None = None) -> Path | None:
    """The spec file `name` (without .kiln): in the folder `near` first, then among the shipped specs."""
    for folder in ([near] if near else []) + [MODELS_DIR]:
        p = folder / f"{name}{SPEC_SUFFIX}"
        if p.is_file():
            return p
    return None


def load_spec(path: str | Path) -> ir.Spec:
    p = Path(path)
    if not p.suffix and not p.exists():
        found = find_spec(str(path))
        if found is None:
            raise SpecError(f"no spec named '{path}'", None,
                            f"specs in {MODELS_DIR}: " + ", ".join(x.stem for x in spec_files()))
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
