"""
Check one exercise: run its checks (pytest node ids from course/exercises.toml) in a subprocess
on one CPU thread with a time limit.

    python course/check.py ID            from the root of the copy you work in

Passes (exit code 0) only when every check ran and passed: a crash, a skip, a check that does
not exist and a run past the time limit all count as failures. While the exercise (or another
one) is still stripped, other tests of the suite fail too: it prints which ones to expect.
"""

import os
import signal
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make import KitError, OneLineParser, load, marker, split_target  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TIME_LIMIT = 120  # seconds for one exercise's checks; each should take well under 30 s
JUNIT_TAGS = {"failure": "failed", "error": "error", "skipped": "skipped"}


def one_thread_env():
    """The environment checks run in: one CPU thread, the Triton interpreter, no bytecode files
    (the kit rewrites sources faster than their timestamps change)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TRITON_INTERPRET="1",
               CUDA_VISIBLE_DEVICES="", PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTEST_ADDOPTS", None)
    return env


def run_checks(root, checks, time_limit=TIME_LIMIT, stop_at_first_failure=False):
    """{node id: (outcome, seconds, message)} with outcome passed | failed | error | skipped |
    missing | crash | timeout, for every check, from one pytest subprocess in root."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   "-o", "junit_family=xunit1", f"--junitxml={report}",
                   *(["-x"] if stop_at_first_failure else []), *checks]
        proc = subprocess.Popen(command, cwd=root, env=one_thread_env(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=time_limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole session: pytest and its children
            proc.communicate()
            return {c: ("timeout", time_limit, f"no result within {time_limit} s") for c in checks}
        results = parse_report(report, checks) if report.exists() else {}
    crashed = proc.returncode < 0 or "Fatal Python error" in output  # killed by a signal
    for check in checks:
        if check not in results:
            results[check] = not_run(check, output, crashed)
    return results


def not_run(check, output, crashed):
    """The result of a check pytest never reported."""
    if crashed:
        lines = [line.strip() for line in output.splitlines()]
        fatal = next((x for x in lines if x.startswith("Fatal Python error")), "killed by a signal")
        frame = next((x for x in lines if x.startswith("File") and "site-packages" not in x
                      and "<frozen" not in x), "")
        return "crash", 0.0, f"the test process died: {fatal}\n{frame}"
    if check in output:
        return "missing", 0.0, "not found: the test was renamed or removed\n" + output[-2000:]
    return "missing", 0.0, ("did not run: pytest stopped before it (a check not found, or a "
                            "collection error)\n" + output[-2000:])


def parse_report(report, checks):
    """Map junit testcases back to the node ids asked for."""
    results = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        file = case.get("file") or case.get("classname", "").replace(".", "/") + ".py"
        outcome, message = "passed", ""
        for tag, name in JUNIT_TAGS.items():
            child = case.find(tag)
            if child is not None:
                outcome, message = name, (child.get("message") or "") + "\n" + (child.text or "")
                break
        results[f"{file}::{case.get('name')}"] = (outcome, float(case.get("time", 0)), message)
    return {c: results[c] for c in checks if c in results}


def still_stripped(root, exercises):
    """Ids of the exercises whose marker is still in one of their target files."""
    left = []
    for ex in exercises.values():
        files = {root / split_target(t)[0] for t in ex["targets"]}
        if any(f.exists() and marker(ex["id"]) in f.read_text() for f in files):
            left.append(ex["id"])
    return left


def report(results):
    for check, (outcome, seconds, message) in results.items():
        mark = "ok  " if outcome == "passed" else "FAIL"
        print(f"  {mark} {outcome:<8} {seconds:5.1f} s  {check}")
        if outcome != "passed":
            lines = message.strip().splitlines()
            errors = [line for line in lines if line.startswith("E ")][:4] or lines[-4:]
            shown = errors + [line for line in lines[-1:] if line not in errors]
            print("       " + "\n       ".join(shown))


def by_file(nodes):
    """Node ids as one line per file: 'tests/x.py: all' or 'tests/x.py: test_a, test_b[1]'."""
    files = {}
    for node in sorted(set(nodes)):
        path, _, name = node.partition("::")
        files.setdefault(path, []).append(name or "all")
    return [f"{path}: {', '.join(names)}" for path, names in files.items()] or ["none"]


def expected_red(exercises, ex_id, passed):
    """Print the tests that are red, and should be, besides this exercise's checks."""
    if not passed:
        print(f"until exercise {ex_id} passes, these tests are red too (expected):")
        print("  " + "\n  ".join(by_file(exercises[ex_id]["expected_red"])))
    others = [i for i in still_stripped(ROOT, exercises) if i != ex_id]
    if others:
        print(f"still stripped in this copy: {', '.join(others)}; their tests are red as well:")
        print("  " + "\n  ".join(by_file(t for i in others for t in exercises[i]["expected_red"])))


def main(argv=None):
    parser = OneLineParser(description="Run one exercise's checks.")
    parser.add_argument("id", help="an exercise id from course/exercises.toml")
    parser.add_argument("--time_limit", type=int, default=TIME_LIMIT, help="seconds, all checks")
    args = parser.parse_args(argv)
    try:
        exercises = load()
        if args.id not in exercises:
            raise KitError(f"no exercise {args.id!r}; `python course/make.py --list` lists them")
    except KitError as e:
        print(f"check.py: {e}", file=sys.stderr)
        return 2
    checks = exercises[args.id]["checks"]
    plural = "s" if len(checks) != 1 else ""
    print(f"exercise {args.id}: {len(checks)} check{plural}, one CPU thread, "
          f"{args.time_limit} s limit")
    results = run_checks(ROOT, checks, args.time_limit)
    report(results)
    passed = all(outcome == "passed" for outcome, _, _ in results.values())
    expected_red(exercises, args.id, passed)
    print(f"exercise {args.id}: {'PASSED' if passed else 'not yet'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
