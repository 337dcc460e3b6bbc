"""The README's command blocks, run as written on the CPU, and its command synopsis checked
against the parser that `kiln COMMAND --help` prints.

Every ```sh and ```python block of README.md is one of: the set-up block (`make chat`, `make
test`), the synopsis (checked, not run), or a runnable block. Runnable blocks run as one bash
script (`set -euo pipefail`) with the venv's bin first on PATH (what `. .venv/bin/activate`
does), in a scratch folder that links the repository's configs/: the README's commands run from
the repository root, and what they write (an engine directory) lands in the scratch folder.
A block passes when it exits 0 without a traceback and its output holds what the block is for
(EXPECT); a block this file has no expectations for still has to run cleanly.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from kiln.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = [(m.group(1), m.group(2)) for m in re.finditer(r"```(sh|python)\n(.*?)```", README, re.S)]
SETUP = [b for lang, b in BLOCKS if lang == "sh" and "make chat" in b]
SYNOPSIS = [b for lang, b in BLOCKS if lang == "sh" and b.startswith("kiln check [SPEC]")]
RUNNABLE = [(lang, b) for lang, b in BLOCKS if b not in SETUP and b not in SYNOPSIS]

# What each runnable block is for, keyed by a line it contains: substrings of its output, with
# the number of times each must appear.
EXPECT = {
    'kiln generate --chat "What is the capital of France?"': [
        ("Paris", 2),  # kiln generate, and kiln run of the engine built from the same model
        ("built smollm2-engine: llama, cuda backend, fp16", 1),
        ("spec llama", 1), ("CPU (smoke run, not a benchmark)", 1), ("| first_token_s_median |", 1)],
    "kiln serve &": [
        ('"id":"SmolLM2-135M-Instruct"', 1), ('"object":"chat.completion"', 1),
        ("rate    ok  fail", 1), ("     4     8     0", 1)],
    "from kiln import LLM": [("<|im_start|>user\nHi!<|im_end|>", 1), ("Paris", 1)],
}


def test_blocks_are_all_accounted_for():
    assert len(SETUP) == 1 and len(SYNOPSIS) == 1 and len(RUNNABLE) >= 3
    for key in EXPECT:
        assert sum(key in b for _, b in RUNNABLE) == 1, key


# -- the synopsis against the parser ---------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser, path=()) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_subcommands(sub, path + (name,)) or {path + (name,): sub})
    return found


def _synopsis_entries() -> dict[tuple[str, ...], str]:
    """{("bench", "serve"): "kiln bench serve [--url URL] ..."}: each entry with its continuation
    lines, comments dropped."""
    entries: dict[tuple[str, ...], str] = {}
    key = None
    for line in SYNOPSIS[0].splitlines():
        text = line.split("  #")[0].rstrip()
        if text.startswith("kiln "):
            words = text.split()[1:]
            key = tuple(w for w in words[:2] if re.fullmatch(r"[a-z]+", w))
            if key[0] not in ("bench", "eval"):  # the commands with modes
                key = key[:1]
            assert key not in entries, f"{key} is listed twice"
            entries[key] = text
        else:
            assert key is not None and line.startswith(" "), line
            entries[key] += " " + text.strip()
    return entries


def _options(entry: str, skip: int) -> tuple[set[str], set[str], list[tuple[str, bool]]]:
    """(required options, optional options, [(positional, optional?)]) of one synopsis entry, after its
    first `skip` words ("kiln bench serve"): an option inside [...] is optional; outside, or in
    a (a | b) group, required."""
    required, optional, positional = set(), set(), []
    depth, previous = 0, ""
    for token in re.findall(r"\[|\]|\(|\)|\||[^\s\[\]()|]+", entry)[skip:]:
        if token == "[":
            depth += 1
        elif token == "]":
            depth -= 1
        elif token.startswith("-"):
            (optional if depth else required).add(token)
        elif re.fullmatch(r"[A-Z][A-Z_]*", token) and not previous.startswith("-"):
            positional.append((token, depth > 0))
        if token != "[":  # `--sweep [SHAPES]`: an option's optional value is still its value
            previous = token
    return required, optional, positional


def test_synopsis_lists_every_command_and_option_as_the_parser_has_them():
    commands = _subcommands(build_parser())
    entries = _synopsis_entries()
    assert set(entries) == set(commands)
    for path, parser in commands.items():
        where = "kiln " + " ".join(path)
        required, optional, positional = _options(entries[path], skip=1 + len(path))
        want_req, want_opt, want_pos = set(), set(), []
        exclusive = {a for g in parser._mutually_exclusive_groups if g.required for a in g._group_actions}
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not action.option_strings:
                want_pos.append((action.metavar or action.dest.upper(), action.nargs == "?"))
                continue
            shown = set(action.option_strings) & (required | optional)
            assert shown, f"{where}: {action.option_strings} missing from the README synopsis"
            (want_req if action.required or action in exclusive else want_opt).update(shown)
        assert (required, optional, positional) == (want_req, want_opt, want_pos), where


# -- running the blocks ----------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _run(argv: list[str], cwd: Path, timeout: float) -> tuple[int, str]:
    """Run in a session of its own, so that a server a block starts in the background is
    stopped with it, whatever the block did."""
    proc = subprocess.Popen(argv, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"timed out after {timeout} s:\n{out[-3000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    return proc.returncode, out


@pytest.mark.parametrize("lang, block", RUNNABLE, ids=[b.splitlines()[0][:40] for _, b in RUNNABLE])
def test_block_runs_as_written(tmp_path, lang, block):
    if "127.0.0.1:8000" in block and not _port_free(8000):
        pytest.skip("port 8000, which this block serves on, is taken on this machine")
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    if lang == "sh":
        argv = ["bash", "-c", "set -euo pipefail\n" + block]
    else:
        argv = [sys.executable, "-c", block]
    rc, out = _run(argv, tmp_path, timeout=900)
    assert rc == 0 and "Traceback" not in out, out[-5000:]
    for key, wanted in EXPECT.items():
        if key in block:
            for text, count in wanted:
                assert out.count(text) >= count, (text, out[-5000:])


def test_setup_block():
    """`make chat` as written (its set-up step is up to date in CI: `make test` made it); `make
    test` is what runs this test."""
    block = SETUP[0]
    assert [line.split("#")[0].strip() for line in block.strip().splitlines()] == ["make chat", "make test"]
    venv = ROOT / ".venv"
    if Path(sys.executable).parent != venv / "bin":
        pytest.skip("the tests do not run in the repository's .venv, which `make chat` uses")
    if subprocess.run(["make", "-q", ".venv/.base"], cwd=ROOT, capture_output=True).returncode != 0:
        pytest.skip(".venv/.base is older than pyproject.toml: `make chat` would reinstall")
    rc, out = _run(["make", "chat"], ROOT, timeout=600)
    assert rc == 0 and "Traceback" not in out and "Paris" in out, out[-3000:]
