"""Every command in a fenced ``bash`` block of README.md and docs/*.md is accepted by the CLI.

A ``kdguard ...`` line is parsed by the real click command (options and arguments, nothing runs)
and each ``key=value`` override is merged onto that command's job schema, so an unknown option, an
unknown key or a value of the wrong type fails the test with the file and line of the command.
A ``python benchmarks/x.py ...`` (or ``examples/x.py``) line must name a script that exists and
whose ``add_argument`` calls declare every ``--flag`` the line uses; the script is read with
``ast``, never run.
"""

from __future__ import annotations

import ast
import importlib
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: command → "module:JobSchema" its key=value overrides are checked against (None: the command
#: takes no overrides). Module moves are a one-line change here.
SCHEMAS: dict[str, str | None] = {
    "train-teacher": "kdguard.config:TeacherJob",
    "distill": "kdguard.config:DistillJob",
    "distill-datafree": "kdguard.jobs.datafree:DataFreeABDJob",
    "import-teacher": "kdguard.jobs.import_teacher:ImportJob",
    "defend": "kdguard.defenses:DefenseJob",
    "robustkd": "kdguard.defenses.robustkd.config:RobustKDJob",
    "robustkd-trigger": "kdguard.defenses.robustkd.config:TriggerJob",
    "ssl-pretrain": "kdguard.ssl.config:PretrainJob",
    "badencoder": "kdguard.ssl.config:BadEncoderJob",
    "ssl-probe": "kdguard.ssl.config:ProbeJob",
    "ssl-defend": "kdguard.ssl.config:DefendJob",
    "ssl-grid": "kdguard.ssl.config:GridJob",
    "audit": "kdguard.jobs.audit:AuditJob",
    "audit-summary": None,
    "evaluate": None,
    "demo": None,
    "list": None,
    "suite": None,  # a group: run, report, list, status (suite files are checked by tests/suites)
    "probe": None,  # a group: sv-premise, synthetic, sr-perturbation, target-share (tests/cli/test_probe.py)
}
#: ``kdguard distill --method zskt`` (or ``kd.method=zskt``) runs the data-free job: how the CLI
#: decides that, and how it renames the overrides.
DATAFREE_ROUTE = "kdguard.commands.datafree:datafree_method_requested"
DATAFREE_TRANSLATE = "kdguard.commands.datafree:translate_overrides"
#: where the CLI's typer app and its command-module loader live
CLI_APP = "kdguard.cli:app"
CLI_LOAD = "kdguard.cli:_load_command_modules"

SCRIPT_DIRS = ("benchmarks/", "examples/")
VAR = re.compile(r"\$(\w+)|\$\{(\w+)\}")
ASSIGN = re.compile(r"^(?:export\s+)?([A-Za-z_]\w*)=(.*)$")


def _obj(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass
class Command:
    where: str  # file:line of the command's first line
    words: list[str]


def _bash_blocks(path: Path):
    """(first line number, lines) of each fenced block whose info string starts with ``bash``."""
    block, start, fence = None, 0, None
    for n, line in enumerate(path.read_text().splitlines(), 1):
        s = line.strip()
        if fence is None and s.startswith("```"):
            fence = s
            block, start = ([] if s[3:].strip().startswith("bash") else None), n + 1
        elif fence is not None and s.startswith("```"):
            if block is not None:
                yield start, block
            fence, block = None, None
        elif block is not None:
            block.append(line)


def _logical_lines(start: int, lines: list[str]):
    """(line number, text) with backslash continuations joined."""
    buf, first = "", None
    for i, line in enumerate(lines):
        if first is None:
            first = start + i
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        yield first, buf + line
        buf, first = "", None
    if buf:
        yield first, buf


def _expand(words: list[str], env: dict[str, str]) -> list[str] | None:
    """Words with ``$X`` replaced by the block's own assignments (re-split); None if one is unknown."""
    out = []
    for w in words:
        if not VAR.search(w):
            out.append(w)
            continue
        names = [a or b for a, b in VAR.findall(w)]
        if any(n not in env for n in names):
            return None
        out.extend(shlex.split(VAR.sub(lambda m: env[m.group(1) or m.group(2)], w)))
    return out


def doc_commands() -> tuple[list[Command], list[Command]]:
    """``kdguard`` commands and script commands of every fenced bash block."""
    kdguard, scripts = [], []
    for path in DOC_FILES:
        rel = path.relative_to(ROOT)
        for start, lines in _bash_blocks(path):
            env: dict[str, str] = {}
            for n, text in _logical_lines(start, lines):
                try:
                    words = shlex.split(text, comments=True)
                except ValueError as e:
                    raise AssertionError(f"{rel}:{n}: cannot split the command line ({e})") from None
                if not words:
                    continue
                m = ASSIGN.match(" ".join(words)) if len(words) <= 2 else None
                if m and (len(words) == 1 or words[0] == "export"):
                    env[m.group(1)] = m.group(2)
                    continue
                while words and ASSIGN.match(words[0]):  # PYTHONPATH=x kdguard ...
                    words = words[1:]
                if words and words[0] in ("python", "python3"):
                    words = words[1:]
                if not words:
                    continue
                where = f"{rel}:{n}"
                if words[0] == "kdguard":
                    expanded = _expand(words[1:], env)
                    if expanded is not None:
                        kdguard.append(Command(where, expanded))
                elif words[0].startswith(SCRIPT_DIRS):
                    scripts.append(Command(where, words))
    return kdguard, scripts


KDGUARD_COMMANDS, SCRIPT_COMMANDS = doc_commands()


@pytest.fixture(scope="module")
def cli_group():
    _obj(CLI_LOAD)()
    return typer.main.get_command(_obj(CLI_APP))


def test_docs_hold_commands():
    assert len(KDGUARD_COMMANDS) >= 20 and SCRIPT_COMMANDS


def test_every_cli_command_has_a_schema_entry(cli_group):
    assert set(cli_group.commands) == set(SCHEMAS), "update SCHEMAS in this file"


def _check_overrides(where: str, name: str, params: dict, items: list[str]) -> None:
    from kdguard.config import user_layer

    spec = SCHEMAS[name]
    if name == "distill" and _obj(DATAFREE_ROUTE)(items, params.get("method")):
        spec, items = SCHEMAS["distill-datafree"], _obj(DATAFREE_TRANSLATE)(items)
    if spec is None:
        assert not items, f"{where}: `kdguard {name}` takes no key=value overrides, got {items}"
        return
    schema = OmegaConf.structured(_obj(spec))
    for item in items:
        try:
            OmegaConf.merge(schema, user_layer(None, [item]))
        except Exception as e:  # noqa: BLE001 - any refusal is a wrong doc command
            msg = str(e).splitlines()[0]
            pytest.fail(f"{where}: `kdguard {name}` refuses {item!r} ({spec}): {msg}")


@pytest.mark.parametrize("cmd", KDGUARD_COMMANDS, ids=lambda c: c.where)
def test_kdguard_command_parses(cmd: Command, cli_group):
    name, args = cmd.words[0], cmd.words[1:]
    command = cli_group.commands.get(name)
    assert command is not None, f"{cmd.where}: no command `kdguard {name}`"
    while hasattr(command, "commands") and args:  # a group (kdguard suite run ...): its sub-command
        sub = command.commands.get(args[0])
        assert sub is not None, f"{cmd.where}: no command `kdguard {name} {args[0]}`"
        command, args = sub, args[1:]
    try:
        ctx = command.make_context(name, list(args))
    except Exception as e:  # noqa: BLE001 - click's usage errors
        msg = " ".join(getattr(e, "format_message", lambda: str(e))().split())
        pytest.fail(f"{cmd.where}: `kdguard {name}` does not parse: {msg}")
    _check_overrides(cmd.where, name, ctx.params, list(ctx.params.get("overrides") or []))


def _declared_flags(script: Path) -> set[str]:
    """Option strings of every ``add_argument``/``add_parser`` call in ``script`` (read with ast)."""
    flags = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("add_argument", "add_parser")):
            flags |= {a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)}
    return flags


@pytest.mark.parametrize("cmd", SCRIPT_COMMANDS, ids=lambda c: c.where)
def test_script_command_names_declared_flags(cmd: Command):
    script = ROOT / cmd.words[0]
    assert script.is_file(), f"{cmd.where}: no script {cmd.words[0]}"
    if script.suffix != ".py":
        return
    declared = _declared_flags(script)
    used = {w.split("=", 1)[0] for w in cmd.words[1:] if w.startswith("--")}
    unknown = sorted(used - declared)
    assert not unknown, f"{cmd.where}: {cmd.words[0]} declares no {', '.join(unknown)}"


LINK = re.compile(r"\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces → hyphens."""
    text = heading.strip().lstrip("#").strip().lower()
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors, fence = set(), False
    for line in path.read_text().splitlines():
        if line.strip().startswith("```"):
            fence = not fence
        elif not fence and line.startswith("#"):
            anchors.add(_slug(line))
    return anchors


def test_relative_links_resolve():
    """Every relative link of README.md and docs/*.md names a file that exists, and an anchor of it."""
    bad = []
    for path in DOC_FILES:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for target in LINK.findall(line):
                if re.match(r"[a-z]+:", target):
                    continue
                file, _, anchor = target.partition("#")
                dest = (path.parent / file).resolve() if file else path
                where = f"{path.relative_to(ROOT)}:{n}"
                if not dest.exists():
                    bad.append(f"{where}: no file {file}")
                elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                    bad.append(f"{where}: no heading #{anchor} in {file or path.name}")
    assert not bad, "\n".join(bad)
