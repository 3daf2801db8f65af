"""
Flags and config files for train.py, sample.py and bench.py: typed, and nothing is executed.

    python train.py config/train_shakespeare_char.py --max_iters=2000 --capacity 0.25

Settings live in dataclasses with defaults; each field is a flag of the same name. A config
file holds `key = literal` lines (Python syntax, read with ast.literal_eval). A user's mistake
ends with `fail`: one line on stderr that names the flag or file, exit code 2.
"""

import ast
import sys
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
        return kind(text)
    except ValueError:
        wanted = {bool: "true or false", int: "an integer", float: "a number"}.get(kind, kind.__name__)
        fail(f"--{field.name} expects {wanted}, got {text!r}")


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
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            fail(f"{path}:{node.lineno}: config files hold only `key = value` lines")
        try:
            values[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError:
            fail(f"{path}:{node.lineno}: the value must be a literal")
    return values


def read_flags(argv):
    """`--key value`, `--key=value` and config files -> {key: text}, later ones winning."""
    raw = {}
    args = list(argv)
    while args:
        arg = args.pop(0)
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
