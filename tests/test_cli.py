"""What a user meets first at the command line: -h/--help on every entry point, the help read
from where the flags are declared, and what --compile does on each device."""

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
import torch

import bench
import configurator
import sample
import train
from conftest import tiny_flags
from variants import VARIANTS

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "experiments"))  # the scripts import their helper module `kit` as run from there
EXPERIMENTS = sorted(p.stem for p in (REPO / "experiments").glob("*.py") if p.stem != "kit")
PREPARE = sorted((REPO / "data").glob("*/prepare.py"))


def help_text(main, flag, capsys):
    """main([flag]) must print the usage and exit 0."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([flag])
    assert e.value.code in (0, None)
    return capsys.readouterr().out


def flag_lines(text):
    """{flag: (default, meaning)} of the --help of train.py, sample.py or bench.py."""
    return {m[1]: (m[2], m[3]) for m in re.finditer(r"^ {4}--(\w+)=(\S*)(?: +(.*))?$", text, re.M)}


@pytest.mark.parametrize("flag", ["-h", "--help"])
@pytest.mark.parametrize("program", [train, sample, bench], ids=["train", "sample", "bench"])
def test_help_lists_every_flag_with_its_default_and_meaning(program, flag, capsys):
    shown = flag_lines(help_text(program.main, flag, capsys))
    settings = {"train": [train.TrainConfig], "sample": [sample.SampleConfig], "bench": [bench.BenchConfig]}
    declared = list(settings[program.__name__])
    if program is not sample:  # train.py and bench.py take each variant's own flags too
        declared += [cls for _, cls in VARIANTS.values() if cls]
    for cls in declared:
        for field in fields(cls):
            default, meaning = shown[field.name]
            assert default == configurator.shown_default(field.default)
            assert meaning, f"--{field.name} has no comment beside its field in {cls.__name__}"


def test_train_help_groups_training_model_and_each_variants_flags(capsys):
    text = help_text(train.main, "--help", capsys)
    titles = [line for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert titles[-4:] == ["training:", "--variant mod:", "--variant mom:", "--variant router_tuning:"]
    assert "  model (ignored when init_from loads one)" in text.splitlines()  # TrainConfig's own sections


def test_the_help_is_the_comment_beside_each_field():
    @dataclass
    class Settings:
        # how big
        width: int = 8  # channels per layer
        name: str = ""  # "" = pick one
        quiet: bool = False

    text = configurator.usage("Try me.", [("things", Settings)])
    assert text.splitlines() == ["Try me.", "",
                                 "Flags (--key=value or --key value, after any config files), with their defaults:",
                                 "", "things:", "  how big",
                                 "    " + "--width=8".ljust(28) + "  channels per layer",
                                 "    " + '--name=""'.ljust(28) + '  "" = pick one',
                                 "    --quiet=False"]


def test_a_help_flag_given_as_a_value_is_the_value():
    assert configurator.read_flags(["--start", "-h"]) == {"start": "-h"}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_script_prints_its_flags_with_defaults(name, capsys):
    module = importlib.import_module(name)
    text = help_text(module.main, "--help", capsys)
    assert "--preset" in text and "(default: cpu)" in text and "out-experiments/<preset>" in text


@pytest.mark.parametrize("path", PREPARE, ids=lambda p: p.parent.name)
def test_every_prepare_script_prints_its_flags_with_defaults(path, capsys):
    spec = importlib.util.spec_from_file_location(f"prepare_{path.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = help_text(module.main, "-h", capsys)
    assert "--out_dir" in text and f"(default: {path.parent})" in " ".join(text.split())


# --- --compile -------------------------------------------------------------------------------

@pytest.fixture
def compile_calls(monkeypatch):
    """torch.compile recorded instead of run (a real compile takes a minute on a CPU)."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(model) or model)
    return calls


@pytest.mark.parametrize("setting, compiled, said", [
    (None, False, "compile: off (--compile=auto compiles on CUDA only; --compile=True compiles here too)"),
    ("True", True, "compile: on (--compile=true)"),
    ("False", False, "compile: off (--compile=false)"),
])
def test_compile_true_compiles_on_a_cpu_and_the_log_says_why(dataset, tmp_path, capsys, compile_calls,
                                                            setting, compiled, said):
    train.main(tiny_flags(dataset, tmp_path, max_iters=1, eval_interval=1, compile=setting))
    assert len(compile_calls) == int(compiled)
    assert said in capsys.readouterr().out.splitlines()


def test_compile_auto_compiles_on_cuda_only():
    assert train.compile_choice("auto", "cuda")[0] and not train.compile_choice("auto", "cpu")[0]
    assert not train.compile_choice("false", "cuda")[0] and train.compile_choice("true", "mps")[0]


def test_a_checkpoint_from_before_auto_keeps_its_meaning():
    """Checkpoints stored compile=True when that meant "on CUDA only"."""
    assert train.TrainConfig(compile=True).compile == "auto"
    assert train.TrainConfig(compile=False).compile == "false"


# --- optional packages -----------------------------------------------------------------------

def fake_site(tmp_path):
    """A stand-in for an installed transformers >= 5 and the PyPI package `kernels` it imports."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("class CUDAProperties:\n    pass\n")
    (site / "transformers").mkdir()
    (site / "transformers" / "__init__.py").write_text(
        "from kernels import CUDAProperties\nGPT2LMHeadModel = 'the stand-in'\n")
    (site / "broken").mkdir()
    (site / "broken" / "__init__.py").write_text("import tokenizers_missing_here\n")
    return site


def run_from_repo_root(code, site):
    """`python -c code` from the repository root with `site` on the path after it, as a user's
    site-packages is (kernels.py is found first)."""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(site)}, timeout=120)
    return done.returncode, done.stdout + done.stderr


def test_a_package_importing_pypi_kernels_imports_from_the_repository_root(tmp_path):
    site = fake_site(tmp_path)
    code, out = run_from_repo_root("import transformers", site)
    assert code != 0 and "cannot import name 'CUDAProperties' from 'kernels'" in out  # the shadowing
    code, out = run_from_repo_root(
        "import kernels\n"  # the project's, imported before as bench.py has it
        "from configurator import import_optional\n"
        "(model,), why_not = import_optional('transformers', 'GPT2LMHeadModel')\n"
        "assert (model, why_not) == ('the stand-in', None), why_not\n"
        "import sys; assert sys.modules['kernels'] is kernels and hasattr(kernels, 'use_triton')\n"
        "print('ok')", site)
    assert code == 0 and out.strip() == "ok", out


def test_kernels_py_is_still_found_after_an_optional_import_brought_pypi_kernels(tmp_path):
    code, out = run_from_repo_root(
        "from configurator import import_optional\n"
        "assert import_optional('transformers')[1] is None\n"
        "import kernels; assert hasattr(kernels, 'use_triton'), kernels\n"
        "print('ok')", fake_site(tmp_path))
    assert code == 0 and out.strip() == "ok", out


def test_a_failed_optional_import_says_why_and_not_installed_only_when_it_is_not(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(fake_site(tmp_path)))
    assert configurator.import_optional("no_such_package_here") == \
        (None, "no_such_package_here is not installed (pip install no_such_package_here)")
    assert configurator.import_optional("broken") == \
        (None, "broken failed to import: ModuleNotFoundError: No module named 'tokenizers_missing_here'")
