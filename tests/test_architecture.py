"""The layout the README describes, held by tools: import layers and cycles, function length."""
import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "lorakit"
MAX_LINES = 60


def test_import_contracts_hold():
    """import-linter over pyproject.toml's contracts: layers, forbidden arrows, no cycles."""
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT,
                          capture_output=True, text=True, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert re.search(r"Contracts: (\d+) kept, 0 broken", done.stdout), done.stdout[-2000:]


def _long_functions() -> list[str]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    out.append(f"{path.relative_to(SRC.parent)}::{node.name} ({n} lines, line {node.lineno})")
    return out


def test_no_function_over_the_limit_unless_the_readme_says_why():
    """An exception is written `lorakit/<path>.py::<function>` under the README's heading
    "Long functions, and why", with its reason."""
    readme = (ROOT / "README.md").read_text()
    _, heading, section = readme.partition("Long functions, and why")
    section = section.split("\n#")[0] if heading else ""
    unexplained = [f for f in _long_functions() if f.split(" ")[0] not in section]
    assert not unexplained, f"functions over {MAX_LINES} lines with no reason in the README: {unexplained}"
