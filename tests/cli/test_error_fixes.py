"""Every ``--flag`` and ``dotted.key=`` that an error message suggests exists.

The messages are collected from the source with :mod:`ast`: the string arguments (f-string
constant parts included) of every ``KDGuardError(...)`` and ``unknown_name(...)`` call, and of the
local variables such a call is given. Flags are checked against the options of the ``kdguard``
commands, keys against the fields of the typed job configs.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import re
import typing
from pathlib import Path

import typer

import kdguard

SRC = Path(kdguard.__file__).resolve().parent

# Flags quoted in messages that are not kdguard options, each with the tool it belongs to.
NOT_KDGUARD_FLAGS: dict[str, str] = {}

# ``key=`` text that is not a job key, with why.
NOT_JOB_KEYS: dict[str, str] = {
    "key": "the placeholder of the override syntax `key=value` (kdguard/config.py)",
}

# ``--flag`` as a whole word (``--\0`` or ``--teacher-\0``, built at run time, are not read)
FLAG_RE = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9](?![\w\0-])")
# ``key=`` not glued to a longer word, a comparison (``<=``, ``==``) or an interpolated value
# (``{role}_paths=``: a key spelled at run time is not checked)
KEY_RE = re.compile(r"(?<![\w.\-=<>!\0])([a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)*)=(?!=)")
# a Python call such as ``build_distiller(..., dataset_size=N)``: its keyword arguments are not job keys
CALL_START_RE = re.compile(r"\b[A-Za-z_][\w.]*\(")
FLAG_VALUE_RE = re.compile(r"--[a-z][a-z0-9-]* \S+")

# a dotted word such as ``fineprune.layer`` (a setting named without ``=``); file names are not
# settings
DOTTED_RE = re.compile(r"(?<![\w.\-/\0])([a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)+)(?![\w(/\0])")
FILE_SUFFIXES = (".safetensors", ".json", ".jsonl", ".yaml", ".yml", ".pt", ".png", ".md", ".gz", ".py")

JOB_MODULES = ("kdguard.config", "kdguard.datafree.config", "kdguard.jobs.datafree", "kdguard.defenses",
               "kdguard.defenses.robustkd.config", "kdguard.jobs.import_teacher", "kdguard.ssl.config")


# -- messages in the source ----------------------------------------------------------------------

def _strings(node: ast.AST) -> list[str]:
    """The literal text of an expression: constants and f-string constant parts, recursively.

    The pieces of an f-string are joined with a NUL where a value is interpolated, so text on
    either side of a ``{value}`` is never read as one word.
    """
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return ["".join(v.value if isinstance(v, ast.Constant) else "\0" for v in node.values)]
    out: list[str] = []
    for child in ast.iter_child_nodes(node):
        out += _strings(child)
    return out


def _callee(call: ast.Call) -> str:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def _assignments(scope: ast.AST) -> dict[str, list[ast.AST]]:
    values: dict[str, list[ast.AST]] = {}
    for node in ast.walk(scope):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    values.setdefault(target.id, []).append(node.value)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)) and isinstance(node.target, ast.Name) \
                and node.value is not None:
            values.setdefault(node.target.id, []).append(node.value)
    return values


FIX_KEYWORDS = ("fix", "example")  # helpers that pass a fix on to KDGuardError (check_same_shape, user_layer)


def _message_args(call: ast.Call) -> list[tuple[str, ast.AST]]:
    """``(role, expression)`` of the message text a call carries: ``"problem"`` or ``"fix"``."""
    name = _callee(call)
    out = [("fix", k.value) for k in call.keywords if k.arg in FIX_KEYWORDS]
    if name == "KDGuardError":
        out += [("problem" if i == 0 else "fix", a) for i, a in enumerate(call.args)]
        out += [("problem", k.value) for k in call.keywords if k.arg == "problem"]
    elif name == "unknown_name":
        out += [("problem", a) for a in [*call.args, *(k.value for k in call.keywords)]]
    return out


@functools.cache
def collect_messages() -> tuple[tuple[str, int, str, str], ...]:
    """``(file, line, role, text)`` for every literal piece of an error message in ``src/kdguard``;
    ``role`` is ``"problem"`` or ``"fix"``."""
    found = set()
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        rel = str(path.relative_to(SRC.parent))
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for scope in (tree, *functions):
            local = _assignments(scope)
            body = scope.body if isinstance(scope, ast.Module) else [scope]
            for call in (n for stmt in body for n in ast.walk(stmt) if isinstance(n, ast.Call)):
                for role, arg in _message_args(call):
                    pieces = _strings(arg)
                    for name in (n.id for n in ast.walk(arg) if isinstance(n, ast.Name)):
                        for value in local.get(name, []):
                            pieces += _strings(value)
                    found.update((rel, call.lineno, role, text) for text in pieces)
    return tuple(sorted(found))


def _without_calls(text: str) -> str:
    """``text`` without Python calls ``name(...)`` (nested brackets included) and without the
    values of ``--flag value`` (``--attack-param alpha=0.5`` names a trigger parameter)."""
    text = FLAG_VALUE_RE.sub("", text)
    out, i = [], 0
    for m in CALL_START_RE.finditer(text):
        if m.start() < i:
            continue  # inside a call already removed
        depth, j = 0, m.end() - 1
        while j < len(text):
            depth += {"(": 1, ")": -1}.get(text[j], 0)
            if depth == 0:
                break
            j += 1
        out.append(text[i:m.start()])
        i = j + 1
    out.append(text[i:])
    return "".join(out)


def suggested(pattern: re.Pattern, roles: tuple[str, ...] = ("problem", "fix"),
              keep=lambda word, role: True) -> dict[str, list[str]]:
    """Each match of ``pattern`` in the messages' ``roles`` → where it occurs (``file:line``);
    ``keep(word, role)`` filters the matches."""
    out: dict[str, list[str]] = {}
    for rel, line, role, text in collect_messages():
        if role not in roles:
            continue
        if pattern is not FLAG_RE:
            text = _without_calls(text)
        for m in pattern.finditer(text):
            word = m.group(1) if pattern.groups else m.group(0)
            if keep(word, role):
                out.setdefault(word, []).append(f"{rel}:{line}")
    return out


def suggested_keys() -> dict[str, list[str]]:
    """The settings the messages name: every ``key=`` of a fix, and every dotted one of a problem
    (a problem's undotted ``name=value`` quotes a Python argument, e.g. ``latent_dim=0``)."""
    return suggested(KEY_RE, keep=lambda word, role: role == "fix" or "." in word)


# -- what really exists ----------------------------------------------------------------------------

@functools.cache
def cli_options() -> frozenset[str]:
    """Every option string (``--x``, ``-x``, ``--no-x``) of every ``kdguard`` command."""
    from kdguard import cli

    cli._load_command_modules()
    root = typer.main.get_command(cli.app)
    opts: set[str] = set()
    stack = [root]
    while stack:
        cmd = stack.pop()
        help_option = cmd.get_help_option(cmd.context_class(cmd))
        for param in [*cmd.params, *([help_option] if help_option else [])]:
            opts.update(param.opts)
            opts.update(param.secondary_opts)
        stack.extend(getattr(cmd, "commands", {}).values())  # a group's subcommands
    return frozenset(opts)


def _unwrap(tp):
    """``Optional[X]`` → ``X``."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def job_schemas() -> list[type]:
    import importlib

    jobs = []
    for name in JOB_MODULES:
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__name__.endswith("Job"):
                jobs.append(obj)
    return sorted(set(jobs), key=lambda c: c.__qualname__)


@functools.cache
def job_keys() -> tuple[frozenset[str], frozenset[str]]:
    """``(paths, open_prefixes)``: every dotted field path of every job; the paths of dict-valued
    fields, under which any key is accepted (``attack.params.size``, ``kd.options.variant``)."""
    paths: set[str] = set()
    open_prefixes: set[str] = set()

    def walk(cls: type, prefix: str, seen: tuple[type, ...]) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            path = f"{prefix}{f.name}"
            paths.add(path)
            tp = _unwrap(hints[f.name])
            if dataclasses.is_dataclass(tp) and tp not in seen:
                walk(tp, f"{path}.", (*seen, tp))
            elif typing.get_origin(tp) is dict or tp is dict or tp is typing.Any:
                open_prefixes.add(path)

    for job in job_schemas():
        walk(job, "", (job,))
    return frozenset(paths), frozenset(open_prefixes)


def key_exists(key: str, paths: frozenset[str], open_prefixes: frozenset[str]) -> bool:
    if key in paths:
        return True
    parts = key.split(".")
    return any(".".join(parts[:i]) in open_prefixes for i in range(1, len(parts)))


# -- the checks --------------------------------------------------------------------------------------

def test_collector_finds_the_messages():
    messages = collect_messages()
    assert len(messages) > 300
    texts = [t for *_, t in messages]
    # an f-string's constant parts, a helper's message and a message held in a local variable
    assert any("more than one of --attack, --attack-from and --from-audit names an attack" in t for t in texts)
    assert any("add a batch dimension with x.unsqueeze(0)" in t for t in texts)  # `fix = ...; KDGuardError(p, fix)`
    assert "--attack-from" in suggested(FLAG_RE) and "--data-root" in suggested(FLAG_RE)
    assert "schedule.rounds" in suggested_keys()  # user_layer(example=...)


def test_schemas_and_options_are_found():
    paths, open_prefixes = job_keys()
    assert {"train.epochs", "train.optim.lr", "attack.poison_rate", "clean_fraction", "schedule.rounds",
            "abd.sv.coef", "encoder", "detox.epochs"} <= paths
    assert {"attack.params", "kd.options"} <= open_prefixes
    assert key_exists("attack.params.size", paths, open_prefixes)
    assert not key_exists("train.nope", paths, open_prefixes)
    assert not key_exists("device.cpu", paths, open_prefixes)
    opts = cli_options()
    assert {"--config", "--data-root", "--teacher", "--method", "--attack-from", "--json"} <= opts
    assert "--no-such-flag" not in opts


def test_the_patterns_read_flags_and_keys_only():
    assert FLAG_RE.findall("pass --data-root DIR, not -- or ---x; a-- b --\0 --x-\0") == ["--data-root"]
    assert [m.group(1) for m in KEY_RE.finditer("set train.device=cpu or x==y, a<=b, ENV=1 k = 2")] \
        == ["train.device"]
    text = ("call build_distiller(..., dataset_size=len(train_set)) or G(shape=(3, 4), w=1) or set "
            "kd.options.p=2 (not --attack-param alpha=1); \0_paths=[]")
    assert [m.group(1) for m in KEY_RE.finditer(_without_calls(text))] == ["kd.options.p"]


def test_every_suggested_flag_is_a_kdguard_option():
    opts = cli_options() | set(NOT_KDGUARD_FLAGS)
    bad = {flag: where for flag, where in suggested(FLAG_RE).items() if flag not in opts}
    assert not bad, f"messages suggest options that no kdguard command has: {bad}"


def test_every_suggested_key_is_a_job_setting():
    paths, open_prefixes = job_keys()
    bad = {}
    for key, where in suggested_keys().items():
        if where and not key_exists(key, paths, open_prefixes) and key not in NOT_JOB_KEYS:
            bad[key] = where
    assert not bad, f"messages suggest settings that no job has: {bad}"


def test_every_named_section_setting_exists():
    """``see fineprune.layer``: a dotted word that starts with a config section (``train``,
    ``abd``, ``kd``, ...) must be a setting too, even without ``=``."""
    paths, open_prefixes = job_keys()
    sections = {p.split(".")[0] for p in paths if "." in p}
    named = suggested(DOTTED_RE, keep=lambda word, role: word.split(".")[0] in sections
                      and not word.endswith(FILE_SUFFIXES))
    bad = {word: where for word, where in named.items() if not key_exists(word, paths, open_prefixes)}
    assert not bad, f"messages name settings that no job has: {bad}"


def test_allow_lists_hold_only_words_still_quoted():
    flags, keys = suggested(FLAG_RE), suggested_keys()
    assert set(NOT_KDGUARD_FLAGS) <= set(flags), set(NOT_KDGUARD_FLAGS) - set(flags)
    assert set(NOT_JOB_KEYS) <= set(keys), set(NOT_JOB_KEYS) - set(keys)
