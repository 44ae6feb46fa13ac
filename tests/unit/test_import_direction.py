"""Which part of the pack may import which: every module's imports of the pack (relative, or absolute through
``lora_loom``) are read with ``ast`` and checked against :data:`MAY_IMPORT`, so a layer cannot start leaning on one
above it (the CLI, the benchmarks) without this test naming the file, the line and the import."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NOT_PACK = {".loom", ".gpu", ".git", "dev", "tests", "test-artifacts", "build", "setup.py"}

# Parts of the pack, most specific first: a module belongs to the first part its dotted name starts with.
PARTS = ("composition.comfy_bridge", "composition.runtime", "composition", "retrieval.comfy_bridge", "retrieval",
         "kernels", "files", "playground", "nodes", "bench", "cli",
         "bounded_cache", "version", "comfy_env", "arguments", "__init__", "__main__")
LEAVES = {"bounded_cache", "version", "comfy_env", "arguments"}  # root modules importing nothing of ours
PURE_COMPOSITION = {"composition", "kernels", "files", "bounded_cache"}

# What each part may import besides itself. The ComfyUI-free parts (kernels, files, composition, its runtime,
# retrieval) never reach a bridge, so test_layout's "imports with ComfyUI absent" holds for everything they import.
MAY_IMPORT: dict[str, set[str]] = {
    **{leaf: set() for leaf in LEAVES},
    "kernels": {"bounded_cache"},
    "files": set(),
    "composition": PURE_COMPOSITION,
    "composition.runtime": PURE_COMPOSITION,
    "composition.comfy_bridge": PURE_COMPOSITION | {"composition.runtime"},
    "retrieval": PURE_COMPOSITION,
    # the playground loader's model file is one of the models whose widths the bridge reads
    "retrieval.comfy_bridge": PURE_COMPOSITION | {"composition.comfy_bridge", "retrieval", "playground"},
    "playground": PURE_COMPOSITION | {"composition.runtime", "composition.comfy_bridge", "comfy_env", "arguments"},
    "nodes": PURE_COMPOSITION | {"composition.runtime", "composition.comfy_bridge", "retrieval",
                                 "retrieval.comfy_bridge", "playground", "version"},
    # bench/quality.py builds each method with the real nodes' execute(): it measures what a user's graph runs
    "bench": PURE_COMPOSITION | {"composition.runtime", "composition.comfy_bridge", "retrieval",
                                 "retrieval.comfy_bridge", "playground", "nodes", "comfy_env", "version"},
    "cli": set(PARTS) - {"__init__", "__main__"},
    "__init__": {"nodes"},
    "__main__": {"cli"},
}


def part_of(module: str) -> str:
    return next(p for p in PARTS if module == p or module.startswith(p + "."))


def pack_modules() -> dict[str, Path]:
    """Dotted name inside the pack (``composition.runtime.core``; a package by its own name) -> file."""
    modules = {}
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO)
        if rel.parts[0] in NOT_PACK or rel.parts[0].startswith("."):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported(module: str, path: Path) -> list[tuple[int, str, str]]:
    """``(line, import as written, dotted target inside the pack)`` for each import of the pack in one file."""
    package = module.split(".") if path.name == "__init__.py" and module != "__init__" else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level:
            written = "." * node.level + (node.module or "")
            if node.level - 1 > len(package):
                found.append((node.lineno, written, "<outside the pack>"))
                continue
            base = package[:len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            # `from . import x` names modules; `from .x import y` names x (y may be a function)
            targets = [".".join(base + [a.name]) for a in node.names] if not node.module else [".".join(base)]
            found += [(node.lineno, written, t) for t in targets]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [(node.lineno, n, n.split(".", 1)[1] if "." in n else "__init__")
                      for n in names if n.split(".")[0] == "lora_loom"]
    return found


def test_every_part_imports_only_what_it_may():
    modules = pack_modules()
    assert len(modules) > 100 and "composition.runtime.core" in modules, sorted(modules)[:20]
    offenders = []
    for module, path in sorted(modules.items()):
        source = part_of(module)
        for line, written, target in imported(module, path):
            if target == "<outside the pack>":
                offenders.append(f"{path.relative_to(REPO)}:{line}: {written} reaches outside the pack")
                continue
            part = part_of(target)
            if part != source and part not in MAY_IMPORT[source]:
                offenders.append(f"{path.relative_to(REPO)}:{line}: {source} imports {part} ({written})")
    assert not offenders, "imports against the direction of the layers:\n" + "\n".join(offenders)


def test_the_rules_cover_every_part_and_have_no_cycle():
    assert set(MAY_IMPORT) == set(PARTS)
    assert all(targets <= set(PARTS) for targets in MAY_IMPORT.values())
    done: set[str] = set()

    def visit(part: str, path: tuple[str, ...]) -> None:
        assert part not in path, "cycle: " + " -> ".join(path + (part,))
        if part not in done:
            for target in MAY_IMPORT[part] - {part}:
                visit(target, path + (part,))
            done.add(part)

    for part in PARTS:
        visit(part, ())


def test_the_check_sees_a_wrong_import(tmp_path):
    """The reader resolves relative levels as Python does: a playground module importing the CLI is caught."""
    probe = tmp_path / "train.py"
    probe.write_text("from ..cli.arguments import int_in\nfrom . import world\nfrom ...x import y\n")
    found = imported("playground.train", probe)
    assert found == [(1, "..cli.arguments", "cli.arguments"), (2, ".", "playground.world"),
                     (3, "...x", "<outside the pack>")]
    assert part_of("cli.arguments") not in MAY_IMPORT["playground"]
