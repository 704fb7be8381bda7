"""The shape of the bot package: no import circles, cogs loaded by name."""

from __future__ import annotations

import ast
from pathlib import Path


def _imports(path: Path, package: str) -> set[str]:
    """Modules of ``package`` that ``path`` imports anywhere: at run time, in functions, or for types."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == package)
    return found


def test_the_front_end_has_no_import_circle() -> None:
    """app -> cogs -> app and service -> views -> service were circles, counting imports for types too."""
    root = Path(__file__).resolve().parents[1]
    modules = {
        ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): path
        for path in (root / "bot").rglob("*.py")
    }
    graph = {name: {m for m in _imports(path, "bot") if m in modules and m != name}
             for name, path in modules.items()}

    def cycle_from(start: str, node: str, seen: tuple[str, ...]) -> tuple[str, ...] | None:
        for nxt in graph[node]:
            if nxt == start:
                return (*seen, nxt)
            if nxt not in seen:
                found = cycle_from(start, nxt, (*seen, nxt))
                if found:
                    return found
        return None

    cycles = [c for name in graph if (c := cycle_from(name, name, (name,)))]
    assert cycles == []
    # The cogs are loaded by name, so the bot module imports none of them.
    assert not any(m.startswith("bot.cogs.") for m in graph["bot.app"])
