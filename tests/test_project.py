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
