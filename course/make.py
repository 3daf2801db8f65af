"""
Cut exercises out of the real code.

    python course/make.py ID --out DIR        a copy of the repo, exercise ID's targets stripped
    python course/make.py --handout DIR       a copy with every exercise stripped, no history
    python course/make.py ID --mistake N --out DIR
                                              a copy with mistake N of exercise ID planted instead
    python course/make.py --list              the exercises, unit by unit

A target `file.py::Qualified.name` is found with ast. Its body is replaced by

    raise NotImplementedError("exercise ID: see course/exercises/ID.md")

keeping the signature and the docstring; a Triton kernel (a function decorated with
triton.jit) gets `tl.static_assert(False, ...)` instead, which fails when the kernel compiles.
A target that does not exist, or a mistake whose text is not found exactly once in its target,
stops the tool with an error: the kit never drifts silently from the code it is cut from.
"""

import argparse
import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

KIT = Path(__file__).resolve().parent
ROOT = KIT.parent
EXERCISES = KIT / "exercises.toml"
FIELDS = ("id", "unit", "minutes", "title", "targets", "checks", "expected_red")
# the answers, and the kit's own test (it needs the real code): never in a student's copy
KIT_ONLY = ("course/INSTRUCTORS.md", "tests/test_course.py")


class KitError(Exception):
    """The kit and the code disagree (a renamed target, a stale mistake): fail loudly."""


def marker(exercise_id):
    return f"exercise {exercise_id}: see course/exercises/{exercise_id}.md"


# --- the list of exercises ---------------------------------------------------------------------

def load(path=EXERCISES):
    """{id: exercise dict}, in the file's order, every field present (`mistakes` is left out of
    a student's copy of the file)."""
    with open(path, "rb") as f:
        kit = tomllib.load(f)
    exercises = {}
    for ex in kit["exercise"]:
        missing = [name for name in FIELDS if name not in ex]
        if missing:
            raise KitError(f"{path.name}: exercise {ex.get('id', '?')} lacks {', '.join(missing)}")
        if ex["id"] in exercises:
            raise KitError(f"{path.name}: exercise {ex['id']} is listed twice")
        ex.setdefault("mistakes", [])
        exercises[ex["id"]] = ex
    return exercises


def split_target(target):
    """'mod.py::RoutedBlock.add_update' -> ('mod.py', ['RoutedBlock', 'add_update'])."""
    path, sep, qualname = target.partition("::")
    if not sep or not path.endswith(".py") or not qualname:
        raise KitError(f"target {target!r} is not of the form file.py::Qualified.name")
    return path, qualname.split(".")


# --- finding a function with ast ---------------------------------------------------------------

def definitions(statements):
    """Functions and classes defined by these statements, looking inside if/try/with blocks
    (kernels.py defines its kernels under `if TRITON_AVAILABLE:`) but not inside functions."""
    for node in statements:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for block in ("body", "orelse", "handlers", "finalbody"):
                yield from definitions(getattr(node, block, []))
        elif isinstance(node, ast.ExceptHandler):
            yield from definitions(node.body)


def locate(tree, names, target):
    """The FunctionDef that names (['Class', 'method']) points to in tree."""
    scope, node = tree.body, None
    for name in names:
        found = [n for n in definitions(scope) if n.name == name]
        if len(found) != 1:
            how_many = len(found) or "no"
            raise KitError(f"target {target}: {how_many} definitions of {name!r}")
        node, scope = found[0], found[0].body
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        raise KitError(f"target {target} is a class; name one of its methods")
    return node


def is_triton_kernel(node):
    return any(ast.unparse(d).endswith("jit") for d in node.decorator_list)


def body_span(node, lines):
    """(first, last) 1-based lines of the body to replace: everything after the docstring,
    including comments between the docstring and the code and right after the last line."""
    body = node.body
    has_docstring = (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                     and isinstance(body[0].value.value, str))
    code = body[1:] if has_docstring else body
    if not code:
        raise KitError(f"{node.name}: nothing after the docstring to strip")
    first = min([code[0].lineno] + [d.lineno for d in getattr(code[0], "decorator_list", [])])
    if first == node.lineno:
        raise KitError(f"{node.name}: a one-line def cannot be stripped")
    start = body[0].end_lineno + 1 if has_docstring else first
    while not has_docstring and start > node.lineno + 1 and lines[start - 2].lstrip()[:1] == "#":
        start -= 1  # comments above the first statement belong to the body
    last = node.end_lineno
    indent = len(lines[first - 1]) - len(lines[first - 1].lstrip())
    while last < len(lines) and lines[last].strip().startswith("#") and \
            len(lines[last]) - len(lines[last].lstrip()) >= indent:
        last += 1  # trailing comments at the body's indentation
    return start, last, indent


# --- editing sources ---------------------------------------------------------------------------

def strip(source, target, exercise_id):
    """source with target's body replaced by the exercise's marker."""
    _, names = split_target(target)
    lines = source.split("\n")
    node = locate(ast.parse(source), names, target)
    start, last, indent = body_span(node, lines)
    if is_triton_kernel(node):  # fails when the kernel is compiled, whatever the arguments
        stub = f'tl.static_assert(False, "{marker(exercise_id)}")'
    else:
        stub = f'raise NotImplementedError("{marker(exercise_id)}")'
    return "\n".join(lines[:start - 1] + [" " * indent + stub] + lines[last:])


def plant(source, mistake):
    """source with a mistake's `find` replaced by its `replace`, inside its target only."""
    target = mistake["target"]
    _, names = split_target(target)
    lines = source.split("\n")
    node = locate(ast.parse(source), names, target)
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    before, after = lines[:first - 1], lines[node.end_lineno:]
    body = "\n".join(lines[first - 1:node.end_lineno])
    count = body.count(mistake["find"])
    if count != 1:
        raise KitError(f"mistake in {target}: {mistake['find']!r} occurs {count} times there, "
                       f"not once")
    new = "\n".join(before + [body.replace(mistake["find"], mistake["replace"])] + after)
    ast.parse(new)  # a mistake is a plausible bug, never a syntax error
    return new


def stripped_files(root, exercises):
    """{relative path: new source} with every target of these exercises stripped."""
    sources = {}
    for ex in exercises:
        for target in ex["targets"]:
            path, _ = split_target(target)
            if path not in sources:
                if not (root / path).is_file():
                    raise KitError(f"target {target}: {path} does not exist")
                sources[path] = (root / path).read_text()
            sources[path] = strip(sources[path], target, ex["id"])
    return sources


def mistake_files(root, exercise, number):
    """{relative path: new source} with mistake `number` (1-based) of the exercise planted."""
    mistakes = exercise["mistakes"]
    if not 1 <= number <= len(mistakes):
        raise KitError(f"exercise {exercise['id']} has mistakes 1..{len(mistakes)}, not {number}")
    mistake = mistakes[number - 1]
    path, _ = split_target(mistake["target"])
    if mistake["target"] not in exercise["targets"]:
        raise KitError(f"exercise {exercise['id']}: mistake {number} is in {mistake['target']}, "
                       f"not one of its targets")
    return {path: plant((root / path).read_text(), mistake)}


# --- copying the repository --------------------------------------------------------------------

def repo_files(root):
    """Relative paths of the files a copy holds: tracked and untracked-but-not-ignored ones when
    root is a git checkout, every file but caches and virtual environments otherwise."""
    try:
        command = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
        out = subprocess.run(command, cwd=root, capture_output=True, check=True).stdout
        return sorted({p for p in out.decode().split("\0") if p and (root / p).is_file()})
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", "__pycache__", ".pytest_cache"}
        paths = (p.relative_to(root) for p in root.rglob("*") if p.is_file())
        return sorted(str(p) for p in paths if not skip & set(p.parts)
                      and not any(part.startswith((".venv", "out")) for part in p.parts))


def copy_repo(root, out, leave_out=()):
    out = Path(out)
    existing = next(p for p in [out.absolute(), *out.absolute().parents] if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == out.absolute() else f"lies under the file {existing}"
        raise KitError(f"{out} {where}: choose a new folder")
    if out.exists() and any(out.iterdir()):
        raise KitError(f"{out} exists and is not empty: choose a new folder")
    for rel in repo_files(root):
        if rel in leave_out:
            continue
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, out / rel)


def without_mistakes(toml_text):
    """exercises.toml for a student's copy: every [[exercise.mistakes]] table left out, so that
    a planted mistake cannot be looked up."""
    kept, in_mistake = [], False
    for line in toml_text.split("\n"):
        if line.startswith("[[") or line.startswith("# ---"):
            in_mistake = line.strip() == "[[exercise.mistakes]]"
        if not in_mistake:
            kept.append(line)
    return "\n".join(kept)


def student_copy(out, files, exercises_file):
    """A copy of the repo for students: files written in, the kit's answers and the mistakes
    left out, and the exercise list it was made from too when that lies inside the repo."""
    leave_out = set(KIT_ONLY)
    if exercises_file.resolve().is_relative_to(ROOT):
        leave_out.add(str(exercises_file.resolve().relative_to(ROOT)))
    copy_repo(ROOT, out, leave_out)
    files = dict(files)
    files.setdefault("course/exercises.toml", EXERCISES.read_text())
    files["course/exercises.toml"] = without_mistakes(files["course/exercises.toml"])
    write(out, files)


def write(out, files):
    for rel, text in files.items():
        Path(out, rel).write_text(text)


# --- command line ------------------------------------------------------------------------------

class OneLineParser(argparse.ArgumentParser):
    """A flag mistake ends in one line on stderr and exit code 2, not in the usage text."""

    def error(self, message):
        print(f"{self.prog}: {message} (--help lists the flags)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv):
    parser = OneLineParser(description="Cut exercises out of the real code.")
    parser.add_argument("id", nargs="?", help="an exercise id from course/exercises.toml")
    parser.add_argument("--out", help="write a copy of the repo with the exercise stripped here")
    parser.add_argument("--handout", help="write a copy with every exercise stripped here")
    parser.add_argument("--mistake", type=int, help="plant this mistake (1-based), not the stub")
    parser.add_argument("--exercises", default=str(EXERCISES),
                        help="the list of exercises (a TOML file; your own for held-out mistakes)")
    parser.add_argument("--list", action="store_true", help="list the exercises and exit")
    return parser.parse_args(argv)


def handout(exercises, out, exercises_file):
    student_copy(out, stripped_files(ROOT, exercises.values()), exercises_file)
    print(f"{out}: every exercise stripped ({len(exercises)}); start with course/README.md")


def one_exercise(exercises, ex_id, out, exercises_file, mistake=None):
    if ex_id not in exercises:
        raise KitError(f"no exercise {ex_id!r}; `python course/make.py --list` lists them")
    ex = exercises[ex_id]
    files = mistake_files(ROOT, ex, mistake) if mistake else stripped_files(ROOT, [ex])
    student_copy(out, files, exercises_file)
    what = f"mistake {mistake} planted" if mistake else "stripped"
    print(f"{out}: exercise {ex_id} {what}; next: cd {out} && python course/check.py {ex_id}")


def main(argv=None):
    args = parse_args(argv)
    try:
        exercises = load(Path(args.exercises))
        if args.list:
            for ex in exercises.values():
                print(f"unit {ex['unit']}  {ex['id']:<22} {ex['minutes']:>3} min  {ex['title']}")
        elif args.handout and not (args.id or args.out or args.mistake):
            handout(exercises, args.handout, Path(args.exercises))
        elif args.id and args.out and not args.handout:
            one_exercise(exercises, args.id, args.out, Path(args.exercises), args.mistake)
        else:
            raise KitError("give an exercise id and --out DIR, or --handout DIR alone, or --list")
        return 0
    except KitError as e:
        print(f"make.py: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
