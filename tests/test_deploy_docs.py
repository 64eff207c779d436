"""Every command in docs/deploy.md is one that exists, with flags that exist, on paths that exist.

Each `gcloud` command in the page's ```sh blocks is looked up in the installed gcloud SDK's own
command tree (data/cli/gcloud_completions.py: every command and its flags; the same SDK's
`--help` agrees, but takes seconds per command), each `kubectl` and `esp` command is run with
`--help` (kubectl of these machines, this repository's esp); every flag the page passes must exist
there, and every repository path the page names must exist. docker's flags and URLs cannot be
checked offline and are not.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.fixtures import cluster as local

ROOT = local.ROOT
DOC = ROOT / "docs" / "deploy.md"
REPO_DIRS = ("k8s/", "serving/", "worker/", "docs/", "data/", "tests/", "esp/")
# Made by `make model` (docs/training.md), not checked in.
GENERATED = ("models/",)
_WORD = re.compile(r"^[a-z][a-z0-9-]*$")


def _substitutions(line: str) -> tuple[str, list[str]]:
    """`$(...)` taken out of a line (parentheses balanced): the line with SUBST, and the commands."""
    inner = []
    while (start := line.find("$(")) >= 0:
        depth, end = 0, start + 1
        for end in range(start + 1, len(line)):
            depth += {"(": 1, ")": -1}.get(line[end], 0)
            if depth == 0:
                break
        inner.append(line[start + 2 : end])
        line = line[:start] + "SUBST" + line[end + 1 :]
    return line, inner


def commands(text: str) -> list[list[str]]:
    """The simple commands of the page's sh blocks: continuations joined, loops, pipes, `&&`,
    `;` and `$(...)` taken apart."""
    found = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            line, inner = _substitutions(line)
            for part in re.split(r"\s*(?:&&|\||;)\s*", line) + inner:
                part = re.sub(r"^(for \S+ in .*|do|done)$", "", part.strip())
                part = re.sub(r"^do\s+", "", part)
                if not part:
                    continue
                words = shlex.split(part)
                while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
                    words = words[1:]  # VAR=value prefixes
                if words:
                    found.append(words)
    return found


def _flags(words: list[str]) -> list[str]:
    return [w.split("=", 1)[0] for w in words if w.startswith("-") and w not in ("-", "--")]


@functools.cache
def _help(argv: tuple[str, ...]) -> tuple[int, str]:
    env = {**os.environ, "COLUMNS": "200"}
    out = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=120, env=env, check=False)
    return out.returncode, re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)


def _command_help(tool: list[str], words: list[str]) -> tuple[list[str], str]:
    """The longest leading run of sub-command words that has help, and that help."""
    path = []
    for w in words:
        if not _WORD.fullmatch(w):
            break
        path.append(w)
    while path:
        code, text = _help((*tool, *path))
        if code == 0:
            return path, text
        path.pop()
    code, text = _help(tuple(tool))
    return [], text


GCLOUD_TREE = Path("/usr/lib/google-cloud-sdk/data/cli/gcloud_completions.py")


@functools.cache
def _gcloud_tree() -> dict:
    import importlib.util

    assert GCLOUD_TREE.is_file(), f"{GCLOUD_TREE} missing: the gcloud CLI is part of these machines (README, Prerequisites)"
    spec = importlib.util.spec_from_file_location("gcloud_completions", GCLOUD_TREE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.STATIC_COMPLETION_CLI_TREE)


def _check_gcloud(words: list[str]) -> list[str]:
    tree = _gcloud_tree()
    node, path = tree, []
    for w in words[1:]:
        if w in node.get("commands", {}):
            node = node["commands"][w]
            path.append(w)
        else:
            break
    if node is tree or node.get("commands"):
        return [f"`{shlex.join(words)}`: no such gcloud command (stops at `gcloud {' '.join(path)}`)"]
    known = set(node.get("flags", {})) | set(tree.get("flags", {}))
    return [f"`{shlex.join(words)}`: gcloud {' '.join(path)} has no flag {f}" for f in _flags(words[1:]) if f not in known]


def check(words: list[str]) -> list[str]:
    """Problems with one command: an unknown command, an unknown flag, a missing path."""
    problems = []
    tool, rest = words[0], words[1:]
    if tool == "gcloud":
        problems += _check_gcloud(words)
    elif tool in ("kubectl", "esp"):
        exe = [str(local.VENV_BIN / "esp")] if tool == "esp" else [tool]
        globals_text = ""
        if tool == "kubectl":
            # kubectl's global flags may come first (-n esp); they are listed by `kubectl options`.
            globals_text = subprocess.run(["kubectl", "options"], capture_output=True, text=True, timeout=60, check=False).stdout
            while rest and rest[0].startswith("-"):
                rest = rest[2:] if "=" not in rest[0] else rest[1:]
        path, text = _command_help(exe, rest)
        if not path:
            problems.append(f"`{shlex.join(words)}`: no such {tool} command")
        for flag in _flags(words[1:]):
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text + globals_text):
                problems.append(f"`{shlex.join(words)}`: {tool} {' '.join(path)} has no flag {flag}")
    for w in words[1:]:
        value = w.split("=", 1)[-1]
        for candidate in (w, value):
            if candidate.startswith(GENERATED):
                continue
            if candidate.startswith(REPO_DIRS):
                path_part = candidate.split("#")[0].rstrip("/")
                if not list(ROOT.glob(path_part)):
                    problems.append(f"`{shlex.join(words)}`: {path_part} does not exist")
    return problems


def test_the_page_has_commands() -> None:
    tools = {c[0] for c in commands(DOC.read_text())}
    assert {"gcloud", "kubectl", "esp", "docker"} <= tools


def test_every_command_exists_with_its_flags_and_paths() -> None:
    cmds = commands(DOC.read_text())
    _gcloud_tree()
    # kubectl's and esp's help take a moment each: ask in parallel.
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(check, cmds))
    problems = [p for r in results for p in r]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "bad",
    [
        "gcloud pubsub subscriptions add-iam-policy-binding comments-scoring --membr=x",
        "gcloud monitoring policies create --policy-from-file=x.yaml",
        "kubectl -n esp rollout status deployment/esp-worker --no-such-flag",
        "esp pubsub init --projet x",
        "kubectl kustomize k8s/overlays/nowhere",
    ],
)
def test_the_check_catches_a_wrong_command(bad: str) -> None:
    assert check(shlex.split(bad))
