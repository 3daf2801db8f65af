"""
The code a student reads keeps the project's readability limits: files of at most 450 lines,
lines of at most 100 characters, functions of at most 40 lines. (Tests are read less and
exempt: their parametrize tables and node ids run long.)
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
READ = sorted(p for pattern in ("*.py", "benchmarks/*.py", "course/*.py", "data/*/*.py",
                                "experiments/*.py") for p in ROOT.glob(pattern))
MAX_FILE_LINES, MAX_LINE_CHARS, MAX_FUNCTION_LINES = 450, 100, 40


@pytest.mark.parametrize("path", READ, ids=[str(p.relative_to(ROOT)) for p in READ])
def test_a_code_file_keeps_the_readability_limits(path):
    source = path.read_text()
    lines = source.split("\n")
    assert len(lines) - 1 <= MAX_FILE_LINES, f"{len(lines) - 1} lines"
    long = [i for i, line in enumerate(lines, 1) if len(line) > MAX_LINE_CHARS]
    assert not long, f"lines over {MAX_LINE_CHARS} characters: {long}"
    functions = (n for n in ast.walk(ast.parse(source))
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
    too_long = {f.name: f.end_lineno - f.lineno + 1 for f in functions
                if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES}
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines: {too_long}"


def test_the_limits_see_the_technique_files():
    names = {p.name for p in READ}
    assert {"model.py", "mod.py", "mom.py", "mindskip.py", "router.py", "kernels.py"} <= names
