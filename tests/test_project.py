"""The README's promises and the project's rules, checked."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.match(r"# ctxvec\n\n```bash\n(.*?)```", text, re.S)
    assert block, "the README must open with its command block, right under the title"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_exactly_two_commands():
    commands = readme_commands()
    assert len(commands) == 2
    assert commands[0].endswith('encode "my name is aj"')
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert readme_commands()[1] in ci.splitlines()


def test_readme_example_runs():
    cli_part = readme_commands()[0].split("&&")[1].strip()
    args = shlex.split(cli_part)[1:]  # drop the .venv/bin/ctxvec path: run this interpreter's
    proc = subprocess.run([sys.executable, "-m", "ctxvec", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "my" in proc.stdout and "name" in proc.stdout and proc.stderr == ""


def test_nothing_is_ever_unpickled():
    pattern = re.compile(r"torch\.load\(|\bimport pickle\b|pickle\.loads?\(|\bdill\b|joblib\.load")
    offenders = [str(p) for p in (ROOT / "src").rglob("*.py") if pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == []


def test_setup_installs_torch_first_and_pinned():
    setup = (ROOT / "scripts" / "setup.sh").read_text(encoding="utf-8")
    torch_line = setup.index('pip install "torch==2.13.0"')
    assert torch_line < setup.index("pip install -e")


# ---- the layout: imports only go downward ------------------------------------------------------

import ast  # noqa: E402

# Bottom to top: a module may import from its own layer's package and from the layers below.
LAYERS = [
    ("ctxvec.files", "ctxvec.texts", "ctxvec.validation", "ctxvec.pairs", "ctxvec.malloc"),
    ("ctxvec.model.config",),
    ("ctxvec.tokenizer",),
    ("ctxvec.model",),  # the readable model: nothing above it, and no engine
    ("ctxvec.engine",),  # how the model runs fast
    ("ctxvec.weights",),
    ("ctxvec.pipeline",),
    ("ctxvec.loading", "ctxvec.evaluation"),  # models by name; how good their vectors are
    ("ctxvec.embed_file", "ctxvec.train", "ctxvec.explain", "ctxvec.serve"),
    ("ctxvec.translate",),
    ("ctxvec.cli",),
    ("ctxvec.__main__", "ctxvec.__init__"),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT / "src").with_suffix("").parts
    return ".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 2 else ".".join(parts)


def _layer(module: str) -> tuple[int, str]:
    """(layer index, the layer's package that holds ``module``): the longest prefix wins."""
    best = (-1, "")
    for i, packages in enumerate(LAYERS):
        for package in packages:
            if (module == package or module.startswith(package + ".")) and len(package) > len(best[1]):
                best = (i, package)
    assert best[0] >= 0, f"{module} is in no layer of LAYERS"
    return best


def _imports() -> dict[str, set[str]]:
    """Every ctxvec module -> the ctxvec modules it imports (at the top or inside a function)."""
    graph = {}
    for path in (ROOT / "src" / "ctxvec").rglob("*.py"):
        name = _module_name(path)
        if name == "ctxvec":
            name = "ctxvec.__init__"
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ctxvec"):
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("ctxvec"))
        graph[name] = found
    return graph


def test_imports_only_go_downward():
    upward = []
    for module, imported in _imports().items():
        layer, package = _layer(module)
        for other in imported:
            other_layer, other_package = _layer(other)
            if other_layer > layer or (other_layer == layer and other_package != package):
                upward.append(f"{module} imports {other}")
    assert upward == []


def test_there_are_no_import_cycles():
    imports = _imports()
    graph = {m: {o for o in imported if o in imports} for m, imported in imports.items()}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for other in graph.get(module, ()):
            assert state.get(other) != 1, "import cycle: " + " -> ".join(path + [other])
            if other not in state:
                visit(other, path + [other])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_the_attention_module_mentions_no_engine_concept():
    text = (ROOT / "src" / "ctxvec" / "model" / "attention.py").read_text(encoding="utf-8").lower()
    for concept in ("pack", "onednn", "mkldnn", "bucket", "batched", "repack", "engine"):
        assert concept not in text, concept


def test_no_module_is_over_about_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "src").rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 420}
    assert long == {}
