"""The house stands: the module graph is acyclic and its layers point one way; the CLI's
help reads as prose. Pure static checks (ast) plus the help texts: a second or two."""

import ast
import re
from pathlib import Path

import typer

PKG = Path(__file__).resolve().parents[1] / "mosc"

# Layers, lowest first: a module may import its own layer and the ones below, never above.
# Base modules are the shared vocabulary (errors, paths, the deploy contract, Arch, the RPC
# client, the greedy loop); then the four worlds in data-flow order; then the application.
LAYERS = [
    ("base", {"mosc", "mosc.errors", "mosc.env", "mosc.fileio", "mosc.tables", "mosc.contract", "mosc.space", "mosc.bert_space", "mosc.rpc",
              "mosc.runtime"}),
    ("nn", "mosc.nn"),
    ("compiler", "mosc.compiler"),
    ("device", "mosc.device"),
    ("search", "mosc.search"),
    ("regress", {"mosc.regress"}),
    ("jobs", "mosc.jobs"),
    ("pipeline", {"mosc.pipeline", "mosc.bert_pipeline"}),
    ("cli", {"mosc.cli", "mosc.__main__"}),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(mod: str) -> int:
    for i, (_, members) in enumerate(LAYERS):
        if (mod in members) if isinstance(members, set) else (mod == members or mod.startswith(members + ".")):
            return i
    raise AssertionError(f"{mod} is in no layer: add it to LAYERS")


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def imports(path: Path):
    """(imported module, line, at module level?) for every import in a file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from mosc import env` imports the module mosc.env
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES]
            names = subs or [node.module]
        for n in names:
            yield n, node.lineno, id(node) in top


def mosc_graph() -> dict[str, set[str]]:
    graph = {}
    for mod, path in MODULES.items():
        deps = set()
        for name, _, _ in imports(path):
            while name and name not in MODULES:  # mosc.nn.model.X -> mosc.nn.model
                name = name.rpartition(".")[0]
            if name and name.startswith("mosc") and name != mod and not mod.startswith(name + "."):
                deps.add(name)
        graph[mod] = deps
    return graph


def test_module_graph_is_acyclic():
    graph, state, cycles = mosc_graph(), {}, []

    def visit(m, stack):
        state[m] = "open"
        for d in graph[m]:
            if d == "mosc":  # the package's own __init__ (version string) imports nothing
                continue
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_layers_point_one_way():
    wrong = []
    for mod, deps in mosc_graph().items():
        for d in deps:
            if layer_of(d) > layer_of(mod):
                wrong.append(f"{mod} ({LAYERS[layer_of(mod)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})")
    assert not wrong, wrong


HEAVY_AT_TOP = {  # world -> packages it may import only inside functions
    "compiler": ("torch", "tvm", "mosc.device", "mosc.nn"),
    "device": ("torch", "tvm"),
    "search": ("torch", "tvm"),
    "base": ("torch", "tvm", "onnxruntime"),
    "regress": ("torch", "tvm"),
    "cli": ("torch", "tvm", "onnxruntime"),
}


def test_heavy_imports_are_lazy():
    wrong = []
    for mod, path in MODULES.items():
        banned = HEAVY_AT_TOP.get(LAYERS[layer_of(mod)][0], ())
        for name, line, top in imports(path):
            if top and any(name == b or name.startswith(b + ".") for b in banned):
                wrong.append(f"{path.relative_to(PKG.parent)}:{line} imports {name} at module level")
    assert not wrong, wrong


def test_cli_help_reads_as_prose():
    """A command's first help paragraph is one sentence on one line (so `mosc --help` never cuts it),
    and no paragraph of any help is hard-wrapped (rich would print the breaks mid-sentence)."""
    from mosc.cli import app

    def walk(cmd, path=()):
        yield path, cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, path + (name,))

    bad = []
    for path, cmd in walk(typer.main.get_command(app)):
        paras = [p for p in (cmd.help or "").split("\n\n") if p.strip()]
        if not paras:
            bad.append(f"{' '.join(path)}: no help")
            continue
        first = paras[0].strip()
        if not first.endswith("."):
            bad.append(f"{' '.join(path)}: first paragraph is not a finished sentence: {first!r}")
        if re.search(r"[.;:]\s+[A-Z]", first.rstrip(".")) and not path == ():
            bad.append(f"{' '.join(path)}: first paragraph is more than one sentence: {first!r}")
        for p in paras:
            if "\n" in p.strip():
                bad.append(f"{' '.join(path)}: hard-wrapped help paragraph: {p.strip()[:60]!r}...")
        for prm in cmd.params:
            h = getattr(prm, "help", None) or ""
            if prm.param_type_name == "option" and "\n" in h:
                bad.append(f"{' '.join(path)} {prm.opts[0]}: help has a line break")
    assert not bad, bad


def test_version_flag():
    from typer.testing import CliRunner

    from mosc import __version__
    from mosc.cli import app

    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"mosc {__version__}"
