"""The library's layout: imports go one way (no cycles), down the floors, and never into ComfyUI."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "tagmoe_core"
# Each package may import only from the floors below it (top-level modules such as errors,
# taxonomy and images are the ground floor; cli, tiny and demo sit on top and may use anything).
# training sits above the pipeline (it reuses the pipeline's conditioning code) and below nothing.
FLOORS = {"runtime": 0, "model": 1, "intent": 2, "pipeline": 3, "training": 4}
COMFY = ("comfy", "comfy_extras", "folder_paths", "server", "execution", "nodes", "latent_preview")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(CORE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(modules of tagmoe_core this file imports, other top-level packages it imports)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    inner, outer = set(), set()
    tree = ast.parse(path.read_text())
    type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                 and getattr(block.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in type_only:  # annotations only: not an import at run time
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                candidates = [target] + [f"{target}.{a.name}" for a in node.names]
                inner |= {c for c in candidates if _exists(c)}
            elif node.module:
                (inner if node.module.startswith("tagmoe_core") else outer).add(node.module)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                (inner if alias.name.startswith("tagmoe_core") else outer).add(alias.name)
    return inner, {m.split(".")[0] for m in outer}


def _exists(module: str) -> bool:
    path = CORE.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in CORE.rglob("*.py"):
        inner, _ = _imports(path)
        graph[_module_name(path)] = {m for m in inner if m != _module_name(path) and m != "tagmoe_core"}
    return graph


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_packages_import_only_downward():
    def floor(module: str) -> int | None:
        parts = module.split(".")
        return FLOORS.get(parts[1]) if len(parts) > 2 else None

    wrong = [f"{src} -> {dst}" for src, dsts in _graph().items() for dst in dsts
             if floor(src) is not None and floor(dst) is not None and floor(dst) > floor(src)]
    assert not wrong, wrong


def test_inference_never_imports_training():
    """Training is a room of its own: only the command line's ``train`` reaches it, never the
    inference path (pipeline, model, nodes) nor the tiny bundle or the demo."""
    offenders = sorted(src for src, dsts in _graph().items()
                       if not src.startswith("tagmoe_core.training") and src != "tagmoe_core.cli"
                       and any(d.startswith("tagmoe_core.training") for d in dsts))
    assert "tagmoe_core.training.loop" in _graph() and not offenders, offenders
    nodes = CORE.parent / "nodes"
    for path in [*nodes.rglob("*.py"), CORE.parent / "__init__.py"]:
        assert "tagmoe_core.training" not in path.read_text() and ".training" not in path.read_text(), path


def test_the_core_never_imports_comfyui():
    offenders = {_module_name(p): sorted(_imports(p)[1] & set(COMFY)) for p in CORE.rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_the_node_pack_imports_fast_and_without_diffusers_or_transformers():
    """ComfyUI imports every pack at start: ours must not pull in the diffusers path's libraries
    (the native nodes never need diffusers; the diffusers-folder nodes import it when they run)."""
    import subprocess
    import sys

    code = (
        "import sys, time; sys.path.insert(0, 'tests'); import torch, numpy, PIL.Image\n"
        "t = time.perf_counter(); from node_harness import load_pack; pack = load_pack()\n"
        "print(time.perf_counter() - t, len(pack.NODE_CLASS_MAPPINGS),"
        " [m for m in ('diffusers', 'transformers', 'accelerate') if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=CORE.parent, capture_output=True, text=True, check=True)
    seconds, count, heavy = out.stdout.strip().split(" ", 2)
    assert heavy == "[]", heavy
    assert int(count) >= 17 and float(seconds) < 1.5, seconds


def test_only_the_bridge_modules_of_the_node_pack_import_comfyui():
    """The nodes are thin adapters: ComfyUI is reached only through nodes/comfy_*.py."""
    nodes = CORE.parent / "nodes"
    offenders = {}
    for path in nodes.rglob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
        if found & set(COMFY) and not path.name.startswith("comfy_"):
            offenders[str(path.relative_to(nodes))] = sorted(found & set(COMFY))
    assert not offenders, offenders
