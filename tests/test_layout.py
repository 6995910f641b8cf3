"""The package's shape, as docs/architecture.md promises it: modules small enough to read in one
sitting, functions short, a shallow import chain at import time, and a runtime that never imports
the engine-build code (which needs TensorRT-LLM's builder). Read from the source with ast: nothing
is imported."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "unidiffuser"
MAX_MODULE_LINES = 360
MAX_FUNCTION_LINES = 65
MAX_CHAIN = 7          # modules in the longest chain of module-level imports inside the package
BUILD = ("unidiffuser.engines", "tensorrt_llm.builder")


def modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imported(name: str, f: Path, nodes) -> set[str]:
    """Absolute names of what the import statements among nodes bring in."""
    base = name.split(".") if f.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                mod = ".".join(base[: len(base) - node.level + 1] + ([mod] if mod else []))
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def test_modules_and_functions_are_short():
    long_modules, long_functions = [], []
    for name, f in modules().items():
        src = f.read_text()
        if src.count("\n") > MAX_MODULE_LINES:
            long_modules.append(f"{name}: {src.count(chr(10))} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name}: {n} lines")
    assert not long_modules, long_modules
    assert not long_functions, long_functions


def test_import_chain_is_shallow():
    mods = modules()
    # a module's own packages are imported before it anyway: not a floor
    graph = {m: {d for d in imported(m, f, ast.parse(f.read_text()).body) if d in mods and not (m + ".").startswith(d + ".")}
             for m, f in mods.items()}
    memo: dict[str, list[str]] = {}

    def chain(m: str, seen: tuple = ()) -> list[str]:
        if m in seen:
            raise AssertionError(f"import cycle at module level: {' -> '.join(seen + (m,))}")
        if m not in memo:
            memo[m] = [m] + max((chain(d, seen + (m,)) for d in graph[m]), key=len, default=[])
        return memo[m]

    longest = max((chain(m) for m in mods), key=len)
    assert len(longest) <= MAX_CHAIN, " -> ".join(longest)


def test_the_runtime_never_imports_build_code():
    offenders = []
    for name, f in modules().items():
        if name.startswith(("unidiffuser.engines", "unidiffuser.bench")):
            continue
        names = imported(name, f, ast.walk(ast.parse(f.read_text())))   # lazy imports too
        offenders += [f"{name} imports {n}" for n in sorted(names) if n.startswith(BUILD)]
    assert not offenders, offenders
