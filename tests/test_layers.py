"""The package's shape, checked (shared/DESIGN.md, "Inside the package"): imports point down the layers

    cli -> stages | views -> evaluation -> inference -> train -> formats | recipes -> model -> errors | console

no stage imports another stage, nothing imports in a circle, a function-level import is only for a module that
loads a heavy package its importer does not (torch, lm_eval, llama_cpp, openvino, matplotlib ...), and every stage
returns the directory it wrote. Each failure names the file and line."""

from __future__ import annotations

import ast
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "slm"

# Layer of each package (or top-level module); a module imports only from its own package or a lower layer.
LAYERS = {
    "slm.__main__": 8,
    "slm.cli": 7,
    "slm.stages": 6, "slm.views": 6,
    "slm.evaluation": 5,
    "slm.inference": 4,
    "slm.train": 3, "slm.energy": 2.5,
    "slm.formats": 2, "slm.recipes": 2,
    "slm.model": 1,
    "slm": 0, "slm.errors": 0, "slm.console": 0, "slm.devices": 0.5,
}
# Third-party packages that cost real time to import: a function-level import of an slm module is justified only
# when it brings one of these that the importing module does not already load. (yaml and rich cost 16 and 30 ms:
# together most of what `slm`'s command line spends importing before a shell completion answers.)
HEAVY = {"torch", "numpy", "transformers", "tokenizers", "tiktoken", "deepspeed", "llama_cpp", "lm_eval", "openvino",
         "nncf", "matplotlib", "gguf", "datasets", "pyarrow", "safetensors", "codecarbon", "scipy", "accelerate",
         "yaml", "rich"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> tuple[str, int]:
    """(the package that sets the layer, its layer)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return key, LAYERS[key]
    raise AssertionError(f"{module}: no layer in tests/test_layers.py's LAYERS")


class Import:
    def __init__(self, src: str, target: str, line: int, in_function: bool):
        self.src, self.target, self.line, self.in_function = src, target, line, in_function

    def where(self) -> str:
        return f"{MODULES[self.src].relative_to(ROOT)}:{self.line}"


def _resolve(base: str, name: str | None) -> str:
    """`from BASE import NAME`: the module NAME when it is one, else BASE."""
    if name and f"{base}.{name}" in MODULES:
        return f"{base}.{name}"
    return base


def scan(module: str, path: Path) -> tuple[list[Import], set[str]]:
    """The slm imports of a module and the third-party packages it imports at module level."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imports: list[Import] = []
    third: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                if child.module == "slm" or child.module.startswith("slm."):
                    for a in child.names:
                        imports.append(Import(module, _resolve(child.module, a.name), child.lineno, in_function))
                elif not in_function:
                    third.add(child.module.split(".")[0])
            elif isinstance(child, ast.Import):
                for a in child.names:
                    if a.name == "slm" or a.name.startswith("slm."):
                        imports.append(Import(module, a.name, child.lineno, in_function))
                    elif not in_function:
                        third.add(a.name.split(".")[0])
            visit(child, inner)

    visit(tree, False)
    return imports, third


SCANNED = {m: scan(m, p) for m, p in MODULES.items()}
IMPORTS = [i for m in SCANNED for i in SCANNED[m][0] if i.target in MODULES]


def heavy(module: str, seen: set[str] | None = None) -> set[str]:
    """The heavy packages that importing MODULE loads (its module-level imports, followed through slm)."""
    seen = set() if seen is None else seen
    if module in seen:
        return set()
    seen.add(module)
    imports, third = SCANNED[module]
    out = third & HEAVY
    for i in imports:
        if not i.in_function and i.target in MODULES:
            out |= heavy(i.target, seen)
    parent = module.rpartition(".")[0]
    if parent in MODULES and parent != module:  # importing a submodule runs its package's __init__ first
        out |= heavy(parent, seen)
    return out


def layer_violations(imports: list[Import]) -> list[str]:
    bad = []
    for i in imports:
        (src_pkg, src_layer), (dst_pkg, dst_layer) = layer_of(i.src), layer_of(i.target)
        if dst_layer > src_layer or (dst_layer == src_layer and dst_pkg != src_pkg):
            bad.append(f"{i.where()}: {i.src} (layer {src_pkg}) imports {i.target} (layer {dst_pkg}), which is not "
                       "below it")
    return bad


def stage_violations(imports: list[Import]) -> list[str]:
    return [f"{i.where()}: {i.src} imports {i.target}: what two stages share belongs in a layer below them"
            for i in imports if i.src.startswith("slm.stages.") and i.target.startswith("slm.stages.")
            and i.target != i.src]


def circle_violations(imports: list[Import]) -> list[str]:
    graph: dict[str, list[Import]] = {}
    for i in imports:
        if i.target != i.src and not i.src.startswith(i.target + "."):  # a package's __init__ is not an edge
            graph.setdefault(i.src, []).append(i)
    circles, state = [], {}

    def dfs(m: str, stack: list[Import]) -> None:
        state[m] = "open"
        for i in graph.get(m, []):
            if state.get(i.target) == "open":
                start = next((k for k, e in enumerate(stack) if e.src == i.target), len(stack))
                circles.append(" -> ".join(f"{e.src} ({e.where()})" for e in stack[start:] + [i]) + f" -> {i.target}")
            elif i.target not in state:
                dfs(i.target, stack + [i])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            dfs(m, [])
    return circles


def runs_it(i: Import) -> bool:
    """A command of the command line imports what it runs (a stage, a view, the energy meter) when it runs: `slm`
    and every shell completion start without them (their import time is measured in the README's Layout)."""
    return i.src.startswith("slm.cli") and not i.target.startswith(("slm.cli", "slm.errors"))


def lazy_violations(imports: list[Import]) -> list[str]:
    return [f"{i.where()}: {i.target} imported inside a function; it loads nothing heavy that {i.src} does not "
            "already load: import it at the top of the module"
            for i in imports if i.in_function and not heavy(i.target) - heavy(i.src) and not runs_it(i)]


def test_imports_point_down_the_layers():
    bad = layer_violations(IMPORTS)
    assert not bad, "\n".join(bad)


def test_no_stage_imports_another_stage():
    bad = stage_violations(IMPORTS)
    assert not bad, "\n".join(bad)


def test_no_import_circles():
    bad = circle_violations(IMPORTS)
    assert not bad, "\n".join(bad)


def test_function_level_imports_are_for_heavy_modules_only():
    bad = lazy_violations(IMPORTS)
    assert not bad, "\n".join(bad)


def test_every_stage_returns_the_path_it_wrote():
    bad = []
    for module, path in MODULES.items():
        if not module.startswith("slm.stages."):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        runs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run"]
        if not runs:
            bad.append(f"{path.relative_to(ROOT)}: no run(cfg)")
            continue
        ret = runs[0].returns
        if not (isinstance(ret, ast.Name) and ret.id == "Path"):
            bad.append(f"{path.relative_to(ROOT)}:{runs[0].lineno}: run() returns "
                       f"{ast.unparse(ret) if ret else 'nothing declared'}, not the Path it wrote")
    assert not bad, "\n".join(bad)


def test_an_import_added_back_is_refused_with_its_line():
    """The rules see a stage import, a layer break, a circle and a light lazy import when one is added back, and
    name the file and line."""
    sft, chat = "slm.stages.sft", "slm.formats.chat"
    stage = Import(sft, "slm.stages.dpo", 7, in_function=True)
    assert f"slm/stages/sft.py:7: {sft} imports slm.stages.dpo" in stage_violations(IMPORTS + [stage])[0]
    up = Import(chat, sft, 3, in_function=False)
    assert any(v.startswith(f"slm/formats/chat.py:3: {chat} (layer slm.formats) imports {sft} (layer slm.stages)")
               for v in layer_violations(IMPORTS + [up]))
    back = Import("slm.formats.records", chat, 5, in_function=True)  # chat imports records: a circle
    assert any("slm/formats/records.py:5" in v for v in circle_violations(IMPORTS + [back]))
    lazy = Import(sft, "slm.errors", 9, in_function=True)
    assert lazy_violations([Import("slm.cli.post", "slm.errors", 4, in_function=True)])
    assert lazy_violations([lazy]) == [f"slm/stages/sft.py:9: slm.errors imported inside a function; it loads "
                                       f"nothing heavy that {sft} does not already load: import it at the top of "
                                       "the module"]
