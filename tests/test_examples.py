"""Every example the README and `--help` show: the query examples run verbatim against the demo
atlas (`concept-atlas demo`, built once here) from a folder that holds `demo_out/` and the shipped
sample image `examples/img.png`; the examples that build, download or name the user's own files
are parsed by the real argument parser (their flags and values must exist).
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
# commands that only read an atlas (or a model) and write into the working folder
READS = ("sql", "latent", "similar", "search", "routes", "explain", "layers")


def commands(text: str) -> list[str]:
    """The `concept-atlas ...` commands of shell text: continuation lines (a trailing
    backslash) joined, trailing comments stripped."""
    lines = re.sub(r"\\\n\s*", " ", text).splitlines()
    return [line.split("  #")[0].strip() for line in lines
            if line.strip().startswith("concept-atlas ")]


def readme_examples() -> list[str]:
    """The commands of the README's shell blocks."""
    text = (REPO / "README.md").read_text()
    return [c for b in re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, re.S)
            for c in commands(b)]


def help_examples() -> list[str]:
    """The `concept-atlas ...` lines under `examples:` of every subcommand's --help."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    found = []
    for name, sp in sub.choices.items():
        sp = build_parser(name)._subparsers._group_actions[0].choices[name]
        found += commands(sp.epilog or "")
    return found


EXAMPLES = sorted(set(readme_examples()) | set(help_examples()))


def runs_verbatim(command: str) -> bool:
    words = shlex.split(command)
    return (words[1] in READS and ("demo_out" in words or words[1] in ("explain", "layers"))
            and "cat.jpg" not in command and "resnet50" not in command)


def test_the_examples_cover_every_query_command() -> None:
    run = {shlex.split(c)[1] for c in EXAMPLES if runs_verbatim(c)}
    assert run == set(READS), sorted(set(READS) - run)
    assert (REPO / "examples" / "img.png").is_file()


@pytest.mark.parametrize("command", [c for c in EXAMPLES if not runs_verbatim(c)])
def test_an_example_that_builds_or_names_user_files_parses(command) -> None:
    words = shlex.split(command)
    args = build_parser(words[1]).parse_args(words[1:])
    assert args.command == words[1]


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory) -> Path:
    """A working folder with `demo_out/` (the demo atlas, built as `concept-atlas demo` builds
    it) and `examples/` (the shipped sample image)."""
    folder = tmp_path_factory.mktemp("examples")
    os.symlink(REPO / "examples", folder / "examples")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "demo"], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=3000)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return folder


# the first test that asks for the demo folder builds the demo atlas (8 minutes on a quiet
# 2-core machine): its limit covers that, not the suite's 900 s per test
@pytest.mark.ray
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("command", [c for c in EXAMPLES if runs_verbatim(c)])
def test_a_query_example_runs_verbatim_on_the_demo_atlas(command, demo_folder) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    words = shlex.split(command)
    done = subprocess.run([sys.executable, "-m", "jobs.cli", *words[1:]], cwd=demo_folder,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    assert done.stdout.strip() or list(demo_folder.glob("*.png")) or list(demo_folder.glob("*.json"))


PYTHON_EXAMPLES = [b for b in re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(),
                                         re.S) if 'Atlas.open("demo_out")' in b]


@pytest.mark.ray
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("block", PYTHON_EXAMPLES)
def test_a_readme_python_example_runs_verbatim_on_the_demo_atlas(block, demo_folder) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", block], cwd=demo_folder, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{block}\n{done.stderr[-3000:]}"
