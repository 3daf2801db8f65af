"""
Flags and config files for train.py, sample.py and bench.py: typed, and nothing is executed;
and the import of packages they can do without.

    python train.py config/train_shakespeare_char.py --max_iters=2000 --capacity 0.25

Settings live in dataclasses with defaults; each field is a flag of the same name, and the
comment beside the field is the flag's help (`-h` / `--help` reads it from the source, so the
help cannot drift from the flags). A config file holds `key = literal` lines (Python syntax,
read with ast.literal_eval). A user's mistake ends with `fail`: one line on stderr that names
the flag or file, exit code 2.

An optional package (transformers, matplotlib) comes through `import_optional`, which imports
it with this folder off the path: kernels.py here would shadow the PyPI package `kernels` that
transformers >= 5 imports. When the import fails, the user reads why, not "not installed".
"""

import ast
import dataclasses
import importlib
import inspect
import io
import json
import math
import sys
import tempfile
import textwrap
import tokenize
from pathlib import Path


def fail(message):
    """Stop on a user's mistake: one line on stderr, exit code 2, no traceback."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def parse_value(text, field):
    """A flag's text -> the field's type, or fail naming the flag."""
    kind = field.type
    try:
        if kind is bool:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        value = kind(text)
    except ValueError:
        wanted = {bool: "true or false", int: "an integer", float: "a number"}.get(
            kind, kind.__name__)
        fail(f"--{field.name} expects {wanted}, got {text!r}")
    if kind is float and not math.isfinite(value):  # nan or inf: no setting means that
        fail(f"--{field.name} expects a finite number, got {text!r}")
    return value


def read_config_file(path):
    """A config file is Python with `key = literal` lines only (nothing runs)."""
    try:
        tree = ast.parse(Path(path).read_text(), filename=str(path))
    except (OSError, SyntaxError, UnicodeDecodeError) as e:
        fail(f"cannot read config file {path}: {e.__class__.__name__}: {e}".splitlines()[0])
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring
        one_name = (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and isinstance(node.targets[0], ast.Name))
        if not one_name:
            fail(f"{path}:{node.lineno}: config files hold only `key = value` lines")
        try:
            values[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError:
            fail(f"{path}:{node.lineno}: the value must be a literal")
    return values


def read_flags(argv, doc="", groups=()):
    """`--key value`, `--key=value` and config files -> {key: text}, later ones winning.
    `-h` or `--help` prints `doc` and the flags of `groups` (see usage) and exits 0."""
    raw = {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            print(usage(doc, groups))
            raise SystemExit(0)
        if not arg.startswith("--"):
            raw.update({k: str(v) for k, v in read_config_file(arg).items()})
            continue
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if not args or args[0].startswith("--"):
                fail(f"--{key} needs a value")
            value = args.pop(0)
        raw[key] = value
    return raw


def build(cls, values):
    """cls(**values), a settings dataclass whose __post_init__ raises ValueError naming the flag."""
    try:
        return cls(**values)
    except ValueError as e:
        fail(str(e))


# --- help ------------------------------------------------------------------------------------

def documented_fields(cls):
    """[(notes, field, meaning)] of a settings dataclass, read from its source: the comment at the
    end of a field's line is its meaning; comment lines of their own above it (a section's title,
    or why the default is what it is) are its notes."""
    source = textwrap.dedent(inspect.getsource(cls))
    inline, own_line = {}, {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            alone = not token.line[:token.start[1]].strip()
            (own_line if alone else inline)[token.start[0]] = token.string.lstrip("#").strip()
    declared = {node.target.id: node for node in ast.parse(source).body[0].body
                if isinstance(node, ast.AnnAssign)}
    rows, previous_end = [], 0
    for field in dataclasses.fields(cls):
        node = declared[field.name]
        notes = [own_line[n] for n in range(previous_end + 1, node.lineno) if n in own_line]
        rows.append((notes, field, inline.get(node.end_lineno, "")))
        previous_end = node.end_lineno
    return rows


def shown_default(value):
    """A default as it would be typed after --flag= (quoted when empty or holding spaces)."""
    text = str(value)
    quote = isinstance(value, str) and (not text or not text.isprintable() or " " in text)
    return json.dumps(text) if quote else text


def usage(doc, groups):
    """The --help text: the entry point's docstring, then each (title, settings dataclass) group
    of flags, one line each: --flag=default and what it means."""
    lines = [textwrap.dedent(doc).strip(), "",
             "Flags (--key=value or --key value, after any config files), with their defaults:"]
    for title, cls in groups:
        lines += ["", f"{title}:"]
        for notes, field, meaning in documented_fields(cls):
            lines += [f"  {note}" for note in notes]
            flag = f"--{field.name}={shown_default(field.default)}"
            lines.append(f"    {flag:<28}  {meaning}".rstrip())
    return "\n".join(lines)


# --- optional packages -----------------------------------------------------------------------

def import_optional(name, *attributes):
    """`from name import attributes` (`import name` without them) -> (the attributes or the
    module, None), or (None, why not: one line for the user). This folder and the project's
    `kernels` module are set aside meanwhile, so that a package's own `import kernels` finds
    the PyPI package of that name, not kernels.py."""
    here = Path(__file__).resolve().parent
    saved_path, before = sys.path[:], sys.modules.get("kernels")
    project_kernels = before is not None and \
        Path(getattr(before, "__file__", None) or "/").resolve().parent == here
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    if project_kernels:
        del sys.modules["kernels"]
    try:
        module = importlib.import_module(name)
        return (tuple(getattr(module, a) for a in attributes) if attributes else module), None
    except Exception as e:  # not only ImportError: a broken install raises anything
        if isinstance(e, ModuleNotFoundError) and e.name == name.split(".")[0]:
            return None, f"{name} is not installed (pip install {name.split('.')[0]})"
        return None, f"{name} failed to import: {type(e).__name__}: {e}".splitlines()[0]
    finally:  # the PyPI `kernels`, if imported, stays with the modules that imported it
        sys.path[:] = saved_path
        if project_kernels:
            sys.modules["kernels"] = before
        elif before is None:
            sys.modules.pop("kernels", None)  # a later `import kernels` finds kernels.py


def check_output_folder(flag, folder):
    """A folder a run creates or fills may be missing, but not be a file or lie under one, and a
    folder must be makeable where it goes (tried with a throwaway one, removed at once: os.access
    says yes to /proc for root). Checked before minutes of work, not after."""
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        fail(f"{flag} {folder}: {existing} is a file, not a folder; pick another {flag}")
    try:
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as e:
        fail(f"{flag} {folder}: cannot make a folder in {existing} ({e.strerror}); "
             f"pick another {flag}")
