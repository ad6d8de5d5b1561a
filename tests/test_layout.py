"""The project's import layers run one way: ``utils`` < ``model`` < ``datasets`` < ``engine`` <
``stages`` < ``runner`` (``pipeline.py``'s) < the entry scripts (docs/DESIGN.md, "Layout"). Checked on the source with ``ast``,
function-local imports included, so that a cycle cannot hide inside a function. Also: one module
writes files by temp file + rename, one module reads the test-only ``$DECOUPLENET_FAULT``."""

from __future__ import annotations

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = {"utils": 0, "model": 1, "datasets": 2, "engine": 3, "stages": 4, "runner": 5}
SCRIPTS = 6  # train_*.py, generate_soft_label.py, evaluate.py, pipeline.py at the top level
# Entry scripts that live inside a package: the original runs `cd datasets && python3 get_thresholds.py`.
COMMANDS_IN_PACKAGES = {"datasets.get_thresholds"}


def project_modules() -> dict[str, str]:
    """Dotted module name -> file, for the packages and the top-level scripts."""
    found = {}
    for name in os.listdir(REPO):
        if name.endswith(".py"):
            found[name[:-3]] = os.path.join(REPO, name)
    for pkg in LAYERS:
        for dirpath, _, files in os.walk(os.path.join(REPO, pkg)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), REPO)[:-3].replace(os.sep, ".")
                    found[rel.removesuffix(".__init__")] = os.path.join(dirpath, f)
    return found


def layer(module: str) -> int:
    if module in COMMANDS_IN_PACKAGES:
        return SCRIPTS
    return LAYERS.get(module.split(".")[0], SCRIPTS)


def imports_of(path: str, module: str, known: dict[str, str]) -> list[tuple[str, int, bool, str]]:
    """``(imported project module, line, function-local, source line)`` for every import."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    tree = ast.parse(source)
    lines = source.splitlines()
    local_nodes = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != module:
                out.append((t, node.lineno, id(node) in local_nodes, lines[node.lineno - 1]))
    return out


def test_imports_run_one_way_without_cycles() -> None:
    known = project_modules()
    assert {"utils.thresholds", "engine.trainer", "stages.phase1", "train_phase1"} <= set(known)
    upward, graph = [], {}
    for module, path in known.items():
        graph[module] = set()
        for target, line, _, _ in imports_of(path, module, known):
            graph[module].add(target)
            if layer(target) > layer(module):
                upward.append(f"{os.path.relpath(path, REPO)}:{line} imports {target}")
    assert not upward, "imports against the layers:\n" + "\n".join(upward)
    # no cycle between modules (within a layer too)
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in graph.get(m, ()):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(t):], t]))
            if t not in state:
                visit(t, [*stack, t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_few_function_local_imports_each_with_its_reason() -> None:
    known = project_modules()
    local = []
    for module, path in known.items():
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        for target, line, is_local, text in imports_of(path, module, known):
            if is_local:
                commented = "#" in text or lines[line - 2].strip().startswith("#")
                local.append((f"{os.path.relpath(path, REPO)}:{line} {target}", commented))
    assert len(local) <= 3, "function-local imports of project modules:\n" + "\n".join(n for n, _ in local)
    assert all(c for _, c in local), "a function-local import needs a comment saying why: " + str(local)


def test_utils_are_leaves() -> None:
    """``utils`` imports nothing from the rest of the project (other ``utils`` modules only)."""
    known = project_modules()
    for module, path in known.items():
        if layer(module) == 0:
            for target, line, _, _ in imports_of(path, module, known):
                assert target.startswith("utils"), f"{path}:{line} imports {target}"


# The flags of one phase: each is declared beside its stage (stages/<module>.py), none in engine/.
PHASE_FLAGS = {
    "phase1": ["--gan", "--lambda_adv_src", "--lambda_adv_tgt", "--lambda_st", "--conf_bank_length", "--conf_p"],
    "phase2": ["--soft_labels_folder", "--thresholds_path", "--src_loss_weight"],
    "soft_labels": ["--output_folder", "--skip_existing", "--soft_label_dtype"],
    "evaluation": ["--split", "--scales", "--flip", "--save_dir", "--results_json"],
}


def flags_defined_in(path: str) -> set[str]:
    """The option strings of every ``add_argument("--...")`` call in ``path`` (checked on the ``ast``)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    return {arg.value for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument"
            for arg in node.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str)
            and arg.value.startswith("-")}


def test_engine_defines_no_flag_of_a_phase() -> None:
    engine_flags: set[str] = set()
    for name in os.listdir(os.path.join(REPO, "engine")):
        if name.endswith(".py"):
            engine_flags |= flags_defined_in(os.path.join(REPO, "engine", name))
    assert {"--batch-size", "--resume", "--num-steps"} <= engine_flags  # the check reads the engine's parser
    for stage, flags in PHASE_FLAGS.items():
        in_engine = sorted(set(flags) & engine_flags)
        assert not in_engine, f"engine/ defines flags of {stage}: {in_engine}"
        missing = sorted(set(flags) - flags_defined_in(os.path.join(REPO, "stages", f"{stage}.py")))
        assert not missing, f"stages/{stage}.py does not define its flags {missing}"
    assert not any(f.startswith(("--lambda_", "--conf_")) for f in engine_flags), sorted(engine_flags)


# ---------------------------------------------------------------------------- one writer, one fault seam
WRITER = "utils/files.py"
FAULTS = "utils/faults.py"
FAULT_HOOKS = {"during_write", "at_iteration"}
TOOL_FOLDERS = ("scripts", "benchmarks")  # project code too, though outside the import layers
RENAME_CALLS = {("os", "replace"), ("os", "rename"), ("os", "renames"), ("shutil", "move")}
TEMP_FILE_CALLS = {"mkstemp", "NamedTemporaryFile"}


def project_files() -> dict[str, str]:
    """Repository-relative path -> file, for the modules of :func:`project_modules` and the tools."""
    found = {os.path.relpath(path, REPO): path for path in project_modules().values()}
    for folder in TOOL_FOLDERS:
        for dirpath, _, files in os.walk(os.path.join(REPO, folder)):
            found.update({os.path.relpath(os.path.join(dirpath, f), REPO): os.path.join(dirpath, f)
                          for f in files if f.endswith(".py")})
    return found


def parsed(path: str) -> ast.Module:
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read())


def temp_file_and_rename_calls(tree: ast.Module) -> list[str]:
    """``os.replace`` / ``os.rename`` / ``shutil.move`` / ``mkstemp`` / ``NamedTemporaryFile`` calls."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            if (func.value.id, func.attr) in RENAME_CALLS or func.attr in TEMP_FILE_CALLS:
                found.append(f"line {node.lineno}: {func.value.id}.{func.attr}")
        elif isinstance(func, ast.Name) and func.id in TEMP_FILE_CALLS:
            found.append(f"line {node.lineno}: {func.id}")
    return found


def test_one_module_writes_by_temp_file_and_rename() -> None:
    """Every file is written through :func:`utils.files.atomic_open`: no other module renames a
    temporary file into place (scripts/ and benchmarks/ included)."""
    writers = {rel: calls for rel, path in project_files().items() if (calls := temp_file_and_rename_calls(parsed(path)))}
    assert set(writers) == {WRITER}, f"temp-file / rename writes outside {WRITER}: " + str(
        {rel: calls for rel, calls in writers.items() if rel != WRITER})


def docstring_nodes(tree: ast.Module) -> set[int]:
    """``id`` of every module, class and function docstring node."""
    owners = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))]
    return {id(owner.body[0].value) for owner in owners
            if owner.body and isinstance(owner.body[0], ast.Expr) and isinstance(owner.body[0].value, ast.Constant)}


def names_the_fault_variable(tree: ast.Module) -> bool:
    """Whether a string in the code (docstrings aside) names ``DECOUPLENET_FAULT``."""
    docs = docstring_nodes(tree)
    return any(isinstance(n, ast.Constant) and isinstance(n.value, str) and "DECOUPLENET_FAULT" in n.value
               and id(n) not in docs for n in ast.walk(tree))


def fault_names_used(tree: ast.Module) -> set[str]:
    """Names taken from utils.faults: ``from utils.faults import X`` and ``faults.X``."""
    used = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "utils.faults"
            for a in n.names}
    used |= {n.attr for n in ast.walk(tree)
             if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "faults"}
    return used


def test_one_module_reads_the_fault_variable() -> None:
    """Only utils/faults.py names ``$DECOUPLENET_FAULT`` in code (docstrings and comments aside),
    and the rest of the project uses only its two hooks: the writer calls ``during_write``, the
    training loop ``at_iteration``. (The tests and benchmarks/ddp_check.py set the variable for
    the processes they start; they are not part of a run.)"""
    readers, other_uses = set(), {}
    for path in project_modules().values():
        rel, tree = os.path.relpath(path, REPO), parsed(path)
        if names_the_fault_variable(tree):
            readers.add(rel)
        if rel != FAULTS and (extra := fault_names_used(tree) - FAULT_HOOKS):
            other_uses[rel] = extra
    assert readers == {FAULTS}, readers
    assert not other_uses, f"utils.faults used beyond its hooks {sorted(FAULT_HOOKS)}: {other_uses}"
