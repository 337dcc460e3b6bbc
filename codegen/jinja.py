"""The one Jinja environment for Kiln's templates (kernels, TensorRT networks).

The templates are the package data of `kiln.templates` (the checkout's templates/ folder,
mapped in pyproject.toml), read through importlib.resources so an editable install and a
wheel find them alike. Undefined names are errors; blocks leave no stray lines.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import jinja2
from kiln.dsl.loader import package_files

TEMPLATE_PACKAGE = "kiln.templates"


class _ResourceLoader(jinja2.BaseLoader):
    """Templates by name from a package's files (`include "header.j2"` finds its sibling)."""

    def __init__(self, package: str):
        self.package = package

    def get_source(self, environment: jinja2.Environment, template: str):
        item = package_files(self.package)
        for part in jinja2.loaders.split_template_path(template):  # refuses '..'
            item = item.joinpath(part)
        if not item.is_file():
            raise jinja2.TemplateNotFound(template)
        source = item.read_text(encoding="utf-8")
        if not isinstance(item, Path):  # not a file on disk (a zip import): it cannot change
            return source, None, lambda: True
        mtime = item.stat().st_mtime

        def uptodate() -> bool:  # like FileSystemLoader: an edited template is read again
            try:
                return item.stat().st_mtime == mtime
            except OSError:
                return False

        return source, str(item), uptodate

    def list_templates(self) -> list[str]:
        return sorted(t.name for t in package_files(self.package).iterdir() if t.name.endswith(".j2"))


@lru_cache(maxsize=1)
def env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=_ResourceLoader(TEMPLATE_PACKAGE),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
