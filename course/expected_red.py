"""
Measure an exercise's expected_red list: strip it in a scratch copy, run the unit test files on
one thread, and print every test that fails besides the exercise's own checks, as TOML to paste
into course/exercises.toml. A whole file when every test of it fails, else per test function
(all its parameters) or per parameter. Minutes per exercise; for maintainers, not students.

    python course/expected_red.py ID [ID ...]
"""

import collections
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check  # noqa: E402
import make  # noqa: E402

# the unit test files; the end-to-end ones (train.py, sample.py, bench.py and the experiments
# run as a user would) go red with every exercise their variant runs through
FILES = ["tests/test_model.py", "tests/test_gpt2_weights.py", "tests/test_router.py",
         "tests/test_mod.py", "tests/test_mom.py", "tests/test_mindskip.py",
         "tests/test_router_tuning.py", "tests/test_kernels.py",
         "tests/test_variants.py", "tests/test_course_checks.py"]


def red_tests(ex):
    """{node id: passed} of FILES with the exercise stripped."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "repo"
        make.copy_repo(make.ROOT, folder)
        make.write(folder, make.stripped_files(folder, [ex]))
        nodes = collect(folder)
        results = check.run_checks(folder, nodes, time_limit=1800)
    return {node: outcome == "passed" for node, (outcome, _, _) in results.items()}


def collect(folder):
    """Node ids of every test in FILES."""
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p",
                          "no:cacheprovider", *[f for f in FILES if (folder / f).exists()]],
                         cwd=folder, capture_output=True, text=True, env=check.one_thread_env())
    return [line for line in out.stdout.splitlines() if "::" in line]


def summarise(passed, checks):
    """The red tests as node ids: a file, a test function, or one parametrisation."""
    by_file = collections.defaultdict(dict)
    for node, ok in passed.items():
        path, name = node.split("::", 1)
        by_file[path][name] = ok
    red = []
    for path, tests in sorted(by_file.items()):
        if not any(tests.values()):
            red.append(path)
            continue
        functions = collections.defaultdict(dict)
        for name, ok in tests.items():
            functions[name.split("[")[0]][name] = ok
        for function, params in functions.items():
            failing = [n for n, ok in params.items() if not ok and f"{path}::{n}" not in checks]
            if len(failing) == len(params):
                red.append(f"{path}::{function}")
            else:
                red += [f"{path}::{n}" for n in failing]
    return red


def table_row(ex):
    """The exercise's row of the table in course/INSTRUCTORS.md, read from its expected_red list:
    each file with how many of its entries are listed, or `all` for the whole file."""
    counts, whole = collections.Counter(), set()
    for node in ex["expected_red"]:
        path = node.split("::")[0].removeprefix("tests/")
        counts[path] += 1
        if "::" not in node:
            whole.add(path)
    cells = [f"{path} ({'all' if path in whole else counts[path]})" for path in sorted(counts)]
    return f"| {ex['id']} | {', '.join(cells)} |"


def main(ids):
    exercises = make.load()
    for ex_id in ids:
        ex = exercises[ex_id]
        red = summarise(red_tests(ex), set(ex["checks"]))
        print(f"# {ex_id}\nexpected_red = [\n" + "".join(f'    "{n}",\n' for n in red) + "]")
        print(f"# its row in course/INSTRUCTORS.md:\n# {table_row(dict(ex, expected_red=red))}")


if __name__ == "__main__":
    main(sys.argv[1:] or list(make.load()))
