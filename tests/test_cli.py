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


# --- bad training flags: one line naming the flag, exit code 2, nothing written ---------------

def user_error(capsys, argv):
    """train.main(argv) must end in exit code 2 and one line on stderr, without a traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("flags, named", [
    (["--beta1=2"], "--beta1"),
    (["--beta2=-1"], "--beta2"),
    (["--seed=99999999999999999999"], "--seed"),
    (["--seed=-1"], "--seed"),
    (["--grad_clip=nan"], "--grad_clip"),
    (["--weight_decay=nan"], "--weight_decay"),
    (["--learning_rate=inf"], "--learning_rate"),
    (["--dropout=nan"], "--dropout"),
    (["--min_lr=1e-2"], "--min_lr"),
    (["--learning_rate=1e-5"], "--min_lr"),  # below the default --min_lr 1e-4
    (["--variant=mod", "--aux_loss_coef=nan"], "--aux_loss_coef"),
    (["--variant=mom", "--router_temperature=inf"], "--router_temperature"),
    (["--variant=mom", "--router_temperature=nan"], "--router_temperature"),
    (["--variant=mom", "--router_temperature=0"], "--router_temperature"),
])
def test_bad_training_flags_are_refused_before_anything_runs(dataset, tmp_path, capsys, flags, named):
    out = tmp_path / "out"
    assert named in user_error(capsys, tiny_flags(dataset, out) + flags)
    assert not out.exists()


def test_min_lr_is_free_without_decay_and_a_variants_own_min_lr_counts():
    assert train.parse_args(["--min_lr=1", "--decay_lr=False"])[0].min_lr == 1
    cfg = train.parse_args(["--variant=router_tuning", "--learning_rate=1e-5"])[0]  # it sets min_lr=0
    assert (cfg.learning_rate, cfg.min_lr) == (1e-5, 0.0)


@pytest.mark.parametrize("where", ["a file", "under a file", "/proc"])
def test_an_out_dir_that_cannot_be_written_is_refused_before_the_model_is_built(dataset, tmp_path, capsys,
                                                                               monkeypatch, where):
    if where == "/proc" and not Path("/proc/self").exists():
        pytest.skip("no /proc here")
    (tmp_path / "file").write_text("mine")
    out = {"a file": tmp_path / "file", "under a file": tmp_path / "file" / "run", "/proc": "/proc/nope"}[where]
    monkeypatch.setattr(train, "setup", lambda *a: pytest.fail("setup ran"))
    assert "--out_dir" in user_error(capsys, tiny_flags(dataset, out))
    assert (tmp_path / "file").read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["chars", "file"]


def test_resume_at_or_past_max_iters_says_so_and_leaves_the_run_alone(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    train.main(tiny_flags(dataset, run, max_iters=4, eval_interval=2))
    files = {p.name: p.read_bytes() for p in run.iterdir()}
    for flags in (["--max_iters=2"], []):  # fewer than done, or the run's own (done already)
        err = user_error(capsys, ["--init_from=resume", f"--out_dir={run}", *flags])
        assert err.startswith(f"--max_iters {2 if flags else 4}:") and "at iter 4 already" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == files
