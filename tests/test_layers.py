"""labkit's layering: no import cycles (imports inside functions count), and no import that goes up a
layer — the README's table of layers ("How it is built") lives here as LAYERS, and a module missing
from it fails the suite, so a new module is placed on purpose."""
import ast
from pathlib import Path

import labkit

PACKAGE = Path(labkit.__file__).parent
BOTTOM = {"env", "errors", "wsl"}   # environment facts and exceptions: everything may import them

# The README's layers, bottom to top. A module may import its own layer and the ones below.
LAYERS = {
    1: {"env", "errors", "wsl"},
    2: {"quant", "gguf", "models", "memory", "hardware", "repack", "modelfile", "offload", "streams", "engines",
        "vision", "llama_cpp_openai"},
    3: {"llamacpp_lab", "vllm_lab", "ollama_lab", "llama_tools", "servers", "cancellable", "rpc", "_supervisor"},
    4: {"quality", "conformance", "bench", "rag", "japanese", "paging", "troubleshoot", "proxy", "monitoring", "deploy",
        "router", "fault_api", "toolcall", "mcp_server", "finetune", "check", "colab", "webui",
        "compile_cache"},
    # on top; with them the old names kept for one release (labkit.eval, labkit.llamacpp, labkit.ollama_compat),
    # which alias modules of lower layers
    5: {"cli", "doctor", "runner", "notebook", "widgets", "syllabus", "eval", "llamacpp", "ollama_compat"},
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts) or "labkit"


def labkit_imports(path: Path) -> set[str]:
    """Modules of labkit that ``path`` imports anywhere (top level or inside a function)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".") if package not in ("", "labkit") else []
            base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            target = ".".join([*base, node.module] if node.module else base)
            names = [target] if node.module else []
            names += [f"{target}.{a.name}".strip(".") for a in node.names]
            found |= {n for n in names if n in MODULES}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("labkit"):
            target = node.module.removeprefix("labkit").strip(".")
            found |= {n for n in [target, *(f"{target}.{a.name}".strip(".") for a in node.names)] if n in MODULES}
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("labkit.") for a in node.names if a.name.removeprefix("labkit.") in MODULES}
    found.discard(me)
    return found


MODULES = {module_name(p) for p in PACKAGE.rglob("*.py")}


def graph() -> dict[str, set[str]]:
    # the package __init__ re-exports for users; it sits above everything and is not part of the layering
    return {module_name(p): labkit_imports(p) - {"labkit"} for p in PACKAGE.rglob("*.py")
            if module_name(p) != "labkit"}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == "open":
                return [*stack[stack.index(m):], m]
            if m not in state and (cycle := visit(m)):
                return cycle
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(edges):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def test_cycle_finder_finds_a_known_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_in_labkit():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_bottom_layer_imports_nothing_above_it():
    edges = graph()
    for name in BOTTOM:
        assert edges[name] <= BOTTOM - {name} if name == "env" else not edges[name], (name, edges[name])


def layer_of(module: str) -> int | None:
    top = module.split(".")[0]            # a subpackage's modules share its layer
    return next((n for n, names in LAYERS.items() if top in names), None)


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
                  for m, deps in edges.items() for d in deps
                  if layer_of(m) is not None and layer_of(d) is not None and layer_of(d) > layer_of(m))


def test_every_module_has_a_layer():
    assert not [m for m in graph() if layer_of(m) is None], "place new modules in LAYERS (and the README)"


def test_upward_import_finder_finds_one():
    assert upward_imports({"memory": {"bench"}, "bench": {"memory"}}) == ["memory (layer 2) imports bench (layer 4)"]
    assert upward_imports({"ollama_lab.app": {"ollama_lab.store", "env"}}) == []


def test_no_import_goes_up_a_layer():
    assert upward_imports(graph()) == []
