"""No import runs up the package's layers (CONTRIBUTING.md, Layering): each module imports only its own package
or packages below it, function-level imports included. Entry points (the `python -m` modules) sit on top."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "smfsr_jax"
# Low to high; packages on one line are beside each other and do not import one another.
LAYERS = (("core",), ("models",), ("convert", "objectives"), ("data",), ("weights",), ("sampling",), ("training",),
          ("evaluation",))
ENTRY_POINTS = {"smfsr_jax.sr", "smfsr_jax.app", "smfsr_jax.demo"}
RANK = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("smfsr_jax"):
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("smfsr_jax"))
    return names


def rank(module: str) -> float:
    if module in ENTRY_POINTS or module.endswith(".__main__"):
        return float("inf")
    parts = module.split(".")
    return RANK[parts[1]] if len(parts) > 1 and parts[1] in RANK else float("inf")


def test_no_import_runs_up_the_layers():
    modules = sorted(PACKAGE.rglob("*.py"))
    packages = {module_name(path).split(".")[1] for path in modules if module_name(path).count(".") >= 2}
    assert packages <= set(RANK), f"packages missing from LAYERS: {sorted(packages - set(RANK))}"
    upward = []
    for path in modules:
        source = module_name(path)
        for target in sorted(imported(path)):
            same_package = source.split(".")[:2] == target.split(".")[:2]
            if not same_package and rank(target) >= rank(source) and rank(source) != float("inf"):
                upward.append(f"{source} imports {target}")
    assert not upward, "imports up (or across) the layers:\n" + "\n".join(upward)
