"""The tree a newcomer walks: the library never imports its drivers, and no two folders import
each other (docs/architecture.md, "Layout")."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imports(path: Path) -> set[str]:
    """Every module `path` imports at run time, at any depth of the file (function-level
    imports too; those under `if TYPE_CHECKING:` are for type checkers only)."""
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", "") == "TYPE_CHECKING"
                   for n in ast.walk(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def unit(module: str) -> str | None:
    """The folder (package) a module belongs to: `pipeline.srd`, `jobs`, `schemas`; a module
    directly under pipeline/ is its own unit (`pipeline.stage`)."""
    parts = module.split(".")
    if parts[0] in ("jobs", "schemas"):
        return parts[0]
    if parts[0] == "pipeline" and len(parts) > 1:
        return "pipeline." + parts[1]
    return None


def exists(unit_name: str) -> bool:
    base = REPO / unit_name.replace(".", "/")
    return base.is_dir() or base.with_suffix(".py").is_file()


def folder_graph() -> dict[str, set[str]]:
    """{folder: the folders its modules import} over pipeline/, jobs/ and schemas/."""
    graph: dict[str, set[str]] = {}
    for top in ("pipeline", "jobs", "schemas"):
        for path in (REPO / top).rglob("*.py"):
            module = ".".join(path.relative_to(REPO).with_suffix("").parts)
            src = unit(module.removesuffix(".__init__")) or top
            targets = {unit(m) for m in imports(path)}
            graph.setdefault(src, set()).update(
                t for t in targets if t is not None and t != src and exists(t))
    return graph


def test_the_library_never_imports_the_drivers() -> None:
    offenders = sorted(str(p.relative_to(REPO)) for p in (REPO / "pipeline").rglob("*.py")
                       if any(m == "jobs" or m.startswith("jobs.") for m in imports(p)))
    assert not offenders, f"pipeline/ imports jobs/ in {offenders}"


def cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every import cycle of `graph`, once each (from its smallest folder)."""
    found = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == path[0]:
                found.append(" -> ".join([*path, nxt]))
            elif nxt not in path and nxt > path[0]:
                visit(nxt, [*path, nxt])

    for start in sorted(graph):
        visit(start, [start])
    return found


def test_no_two_folders_import_each_other() -> None:
    found = cycles(folder_graph())
    assert not found, "import cycles between folders:\n" + "\n".join(found)


def test_the_layout_check_sees_a_planted_cycle(tmp_path, monkeypatch) -> None:
    # the check must be able to fail: a library module importing the drivers, and two
    # folders importing each other, one of them lazily inside a function
    (tmp_path / "pipeline" / "alpha").mkdir(parents=True)
    (tmp_path / "pipeline" / "alpha" / "__init__.py").write_text("import pipeline.beta\n")
    (tmp_path / "pipeline" / "beta.py").write_text(
        "def f():\n    from pipeline.alpha import x\n    import jobs.cli\n")
    (tmp_path / "jobs").mkdir()
    (tmp_path / "schemas").mkdir()
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert cycles(folder_graph()) == ["pipeline.alpha -> pipeline.beta -> pipeline.alpha"]
    assert "jobs.cli" in imports(tmp_path / "pipeline" / "beta.py")
