"""Print every import in moe_arch/ that breaks the package's layering; exit 1 if there is any.

The layers (module-level and function-level imports alike, ``TYPE_CHECKING`` blocks included: a type-only arrow
still says one layer knows another):

- ``config`` imports nothing of ours but ``utils``; ``numerics`` and ``precision`` sit just above it;
- ``model`` knows no training, doctor, data or parallel;
- ``data`` knows no training, model or doctor;
- ``parallel`` knows no training or doctor;
- ``doctor`` knows no training (the trainer calls the monitor, never the reverse);
- ``checkpoint`` knows no training and no doctor.

A layer is the first name under ``moe_arch`` (``moe_arch.model.moe`` -> ``model``). Usage:
``python tools/check_layering.py [package_dir]``.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "moe_arch"

# Layer -> the layers it may import (None: no whitelist) and the layers it must not import.
ONLY: dict[str, set[str]] = {
    "utils": set(),
    "config": {"utils"},
    "numerics": {"utils"},
    "precision": {"utils", "config", "numerics"},
}
FORBIDDEN: dict[str, set[str]] = {
    "model": {"training", "doctor", "data", "parallel"},
    "data": {"training", "model", "doctor"},
    "parallel": {"training", "doctor"},
    "doctor": {"training"},
    "checkpoint": {"training", "doctor"},
}


@dataclass(frozen=True)
class Arrow:
    path: Path
    line: int
    source: str  # importing module, dotted
    target: str  # imported module, dotted

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.source} -> {self.target}"


def module_name(path: Path, package_dir: Path) -> str:
    rel = path.relative_to(package_dir.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    return parts[1] if len(parts) > 1 else ""


def imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, absolute target module) of every import in the file, wherever it sits."""
    is_pkg = path.name == "__init__.py"
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # ``from moe_arch import config`` imports moe_arch.config; ``from moe_arch.x import y`` imports moe_arch.x
            # (y may be a submodule, but it is in x's layer either way unless x is the package itself).
            if prefix == PACKAGE:
                out += [(node.lineno, f"{PACKAGE}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, prefix))
    return out


def broken(source: str, target: str) -> bool:
    src, dst = layer(source), layer(target)
    if src is None or dst is None or src == dst or dst == "":
        return False
    if src in ONLY:
        return dst not in ONLY[src]
    return dst in FORBIDDEN.get(src, set())


def scan(package_dir: Path) -> list[Arrow]:
    arrows = []
    for path in sorted(package_dir.rglob("*.py")):
        module = module_name(path, package_dir)
        for line, target in imports(path, module):
            if broken(module, target):
                arrows.append(Arrow(path.relative_to(package_dir.parent), line, module, target))
    return arrows


def main(argv: list[str]) -> int:
    package_dir = Path(argv[0]) if argv else ROOT / PACKAGE
    arrows = scan(package_dir)
    for a in arrows:
        print(a)
    if arrows:
        print(f"{len(arrows)} import(s) break the layering (see tools/check_layering.py)")
        return 1
    print("layering ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
