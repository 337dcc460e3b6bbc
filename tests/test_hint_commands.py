"""Every command a message suggests exists: the `kiln ...` commands that error messages, hints and
help texts of dsl/, codegen/, runtime/ and api/ name, checked against the CLI's own parser
(kiln.cli.build_parser), subcommand by subcommand and option by option; and every bare `--option`
they name is an option of some kiln command.

The strings are read from the source (every string constant and f-string but docstrings, an
f-string's {fields} read as X), so a hint added anywhere is checked without being listed here.
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest
from kiln.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dsl", "codegen", "runtime", "api")
# Files whose option strings belong to another program: NVRTC's compiler options, and the
# kernel benchmark's own `python -m kiln.codegen.bench_kernels` parser.
FOREIGN_FILES = {"codegen/nvrtc.py", "codegen/bench_kernels.py"}
FOREIGN_COMMANDS = re.compile(r"\b(pip install|nvcc|python -m|pytest|make)\b[^`;]*")
KILN = re.compile(r"(?<![\w./-])kiln (?=[a-z])")
OPTION = re.compile(r"(?<![\w.-])--[a-z][a-z0-9-]*")


def _strings(path: Path):
    """(line, text) of each string constant and f-string of a Python file, docstrings left out."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                skip.add(id(first.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            skip.update(id(v) for v in node.values)
            yield node.lineno, "".join(v.value if isinstance(v, ast.Constant) else "X" for v in node.values)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            yield node.lineno, node.value


def _messages() -> list[tuple[str, str]]:
    out = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            out += [(f"{rel}:{line}", text) for line, text in _strings(path) if rel not in FOREIGN_FILES]
    return out


MESSAGES = _messages()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings}


def _all_options(parser: argparse.ArgumentParser) -> set[str]:
    found = set(_options(parser))
    for sub in _subparsers(parser).values():
        found |= _all_options(sub)
    return found


def commands(text: str) -> list[str]:
    """The `kiln ...` commands of a message: from `kiln` to the closing backtick, or else to the
    end of the clause (a `;`, `)`, `,` or the string's end)."""
    found = []
    for m in KILN.finditer(text):
        rest = text[m.end():]
        quoted = text[:m.start()].count("`") % 2 == 1
        end = rest.find("`") if quoted else min((i for i in (rest.find(c) for c in ";),\n") if i >= 0),
                                                default=len(rest))
        found.append("kiln " + rest[:end if end >= 0 else len(rest)].strip())
    return found


def check_command(command: str, parser: argparse.ArgumentParser) -> list[str]:
    """What in `kiln WORDS...` the parser does not have: a subcommand (each of `a | b` alternatives)
    or an option of the subcommand it names."""
    problems: list[str] = []
    words = [w.rstrip(":.") for w in command.split()[1:]]
    level, i = parser, 0
    while i < len(words) and _subparsers(level):
        subs = _subparsers(level)
        if words[i] == "X":  # an f-string field: any subcommand; its options must be one's
            known = set().union(*(_all_options(p) for p in subs.values()))
            return [f"no option {o} in any subcommand" for o in OPTION.findall(" ".join(words[i:]))
                    if o not in known]
        alternatives = [words[i]]
        while i + 2 < len(words) and words[i + 1] == "|":
            alternatives.append(words[i + 2])
            i += 2
        bad = [w for w in alternatives if w not in subs]
        if bad:
            problems.append(f"no subcommand {' '.join(bad)!r} (has: {', '.join(sorted(subs))})")
            return problems
        level = subs[alternatives[0]]
        i += 1
    if _subparsers(level):
        problems.append(f"names no subcommand of {' '.join(words[:i]) or 'kiln'} (it needs one)")
    known = _options(level)
    for opt in OPTION.findall(" ".join(words[i:])):
        if opt not in known:
            problems.append(f"no option {opt} (has: {', '.join(sorted(o for o in known if o.startswith('--')))})")
    return problems


HINTS = [(where, c) for where, text in MESSAGES for c in commands(text)]


def test_messages_name_kiln_commands():
    """The scan finds the commands hints suggest (so that an empty scan cannot pass)."""
    named = {c.split()[1] for _, c in HINTS}
    assert {"verify", "build", "generate", "serve", "run"} <= named
    assert any("kiln verify SPEC" in c for _, c in HINTS)


@pytest.mark.parametrize("where,command", HINTS, ids=[f"{w}:{c}" for w, c in HINTS])
def test_suggested_kiln_command_exists(where, command):
    problems = check_command(command, build_parser())
    assert not problems, f"{where}: `{command}`: " + "; ".join(problems)


def _bare_options() -> list[tuple[str, str]]:
    out = []
    for where, text in MESSAGES:
        text = KILN.sub("kiln ", text)
        for c in commands(text):  # options inside a kiln command are checked per subcommand above
            text = text.replace(c, "")
        text = FOREIGN_COMMANDS.sub("", text)
        out += [(where, opt) for opt in OPTION.findall(text)]
    return out


BARE = _bare_options()


@pytest.mark.parametrize("where,option", BARE, ids=[f"{w}:{o}" for w, o in BARE])
def test_named_option_exists(where, option):
    assert option in _all_options(build_parser()), f"{where}: {option} is an option of no kiln command"


def test_the_checker_finds_what_is_wrong():
    parser = build_parser()
    assert check_command("kiln verify SPEC", parser) == []
    assert check_command("kiln bench latency | throughput | startup", parser) == []
    assert check_command("kiln verify SPEC --spec SPEC", parser)[0].startswith("no option --spec")
    assert check_command("kiln verfy SPEC", parser)[0].startswith("no subcommand 'verfy'")
    assert check_command("kiln bench latency | fastest", parser)[0].startswith("no subcommand 'fastest'")
    assert check_command("kiln bench", parser) == ["names no subcommand of bench (it needs one)"]
    assert check_command("kiln bench X --device cpu", parser) == []  # an f-string field
    assert check_command("kiln bench X --nope", parser) == ["no option --nope in any subcommand"]
    assert check_command("kiln serve: http://X:X/v1", parser) == []
    assert commands("name it (`kiln verify SPEC`, `kiln build SPEC`), or pass --spec") == [
        "kiln verify SPEC", "kiln build SPEC"]
    assert commands("built for 4 (kiln build --max-batch); rebuild") == ["kiln build --max-batch"]
