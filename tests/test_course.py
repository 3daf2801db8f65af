"""
The course kit (course/) is honest: for every exercise of course/exercises.toml its checks pass
on the real code (each within 30 s), all fail when its targets are stripped, every listed
mistake is caught by at least one of them, and no check needs a later exercise's code (the
order a handout is worked in). A target or check that no longer exists fails here, loudly.

Two copies of the repository are patched in turn; each (exercise, state) runs its checks in one
pytest subprocess on one thread (course/check.py's runner), two at a time.
"""

import ast
import compileall
import queue
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "course"))
import check  # noqa: E402
import expected_red  # noqa: E402
import make  # noqa: E402

EXERCISES = make.load()
MISTAKES = [(ex_id, n) for ex_id, ex in EXERCISES.items()
            for n in range(1, len(ex["mistakes"]) + 1)]
SECONDS_PER_CHECK = 30
WORKERS = 2  # CI has two cores
CAUGHT = ("failed", "error", "crash", "timeout")


def later(ex_id):
    """The exercises after ex_id in the file's order."""
    ids = list(EXERCISES)
    return [EXERCISES[i] for i in ids[ids.index(ex_id) + 1:]]


def states():
    """Every (exercise, state) the kit is proved on: 'stripped'; mistake n; 'in order' (every
    later exercise stripped, as in a handout worked through in order)."""
    for ex_id, ex in EXERCISES.items():
        yield ex_id, "stripped"
        yield from ((ex_id, n) for n in range(1, len(ex["mistakes"]) + 1))
        if later(ex_id):
            yield ex_id, "in order"


def run_state(folder, ex_id, state):
    """The exercise's checks in folder with the state's files written in, then put back. A
    mistake needs one failing check, so that run stops at the first."""
    ex = EXERCISES[ex_id]
    if state == "stripped":
        files = make.stripped_files(folder, [ex])
    elif state == "in order":
        files = make.stripped_files(folder, later(ex_id))
    else:
        files = make.mistake_files(folder, ex, state)
    originals = {rel: (folder / rel).read_text() for rel in files}
    try:
        make.write(folder, files)
        first_failure = isinstance(state, int)
        return check.run_checks(folder, ex["checks"], stop_at_first_failure=first_failure)
    finally:
        make.write(folder, originals)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """{(exercise, state): check results}, WORKERS states at a time, each worker in its own
    copy of the repository."""
    copies = queue.Queue()
    for i in range(WORKERS):
        folder = tmp_path_factory.mktemp(f"course{i}") / "repo"
        make.copy_repo(ROOT, folder)
        copies.put(folder)

    def run(key):
        folder = copies.get()
        try:
            return key, run_state(folder, *key)
        finally:
            copies.put(folder)

    with ThreadPoolExecutor(WORKERS) as pool:
        return dict(pool.map(run, states()))


def spans():
    """(file, first line, last line, target) of every target, sorted."""
    out = []
    for ex in EXERCISES.values():
        for target in ex["targets"]:
            path, names = make.split_target(target)
            node = make.locate(ast.parse((ROOT / path).read_text()), names, target)
            out.append((path, node.lineno, node.end_lineno, target))
    return sorted(out)


# --- the kit against the code, without running tests -------------------------------------------

def test_every_target_and_mistake_resolves_and_no_two_targets_overlap():
    make.stripped_files(ROOT, EXERCISES.values())  # raises on a missing target
    for ex_id, n in MISTAKES:  # raises unless `find` occurs exactly once in its target
        make.mistake_files(ROOT, EXERCISES[ex_id], n)
    for a, b in zip(spans(), spans()[1:]):
        assert a[0] != b[0] or a[2] < b[1], f"{a[3]} and {b[3]} overlap"


def test_a_renamed_target_or_a_stale_mistake_fails_loudly():
    ex = EXERCISES["expert_choice_topk"]
    with pytest.raises(make.KitError, match="no definitions"):
        make.stripped_files(ROOT, [dict(ex, targets=["router.py::expert_choice_top_k"])])
    stale = dict(ex, mistakes=[dict(ex["mistakes"][0], find="no such text")])
    with pytest.raises(make.KitError, match="occurs 0 times"):
        make.mistake_files(ROOT, stale, 1)
    assert make.main(["expert_choice_topk", "--out", str(ROOT / "course")]) == 2  # not empty


def test_every_exercise_has_a_page_and_a_place_in_the_course_readme():
    readme = (ROOT / "course" / "README.md").read_text()
    for ex_id, ex in EXERCISES.items():
        page = ROOT / "course" / "exercises" / f"{ex_id}.md"
        assert page.is_file(), f"{page} is missing"
        assert f"`{ex_id}`" in readme, f"course/README.md never names {ex_id}"
        assert ex["minutes"] > 0 and ex["checks"] and ex["mistakes"], ex_id


def test_the_course_pages_name_the_exercises_in_the_order_they_are_worked():
    """A later exercise's checks may need an earlier one's code: the pages must not invert them."""
    readme = (ROOT / "course" / "README.md").read_text()
    unit_map = (ROOT / "course" / "INSTRUCTORS.md").read_text().split("## Unit map")[1]
    for page, text, mark in (("README.md", readme, "`{}`"), ("INSTRUCTORS.md", unit_map, "{} (")):
        first = sorted(EXERCISES, key=lambda ex_id: text.index(mark.format(ex_id)))
        assert first == list(EXERCISES), f"course/{page} names them as {first}"


def test_the_expected_red_table_for_instructors_is_the_lists_of_exercises_toml():
    text = (ROOT / "course" / "INSTRUCTORS.md").read_text()
    for ex in EXERCISES.values():
        row = expected_red.table_row(ex)
        assert row in text, f"course/INSTRUCTORS.md: the row of {ex['id']} should read {row}"


def test_the_handout_strips_every_exercise_and_still_compiles(tmp_path):
    out = tmp_path / "handout"
    assert make.main(["--handout", str(out)]) == 0
    assert not (out / ".git").exists() and not (out / "course" / "INSTRUCTORS.md").exists()
    assert "[[exercise.mistakes]]" not in (out / "course" / "exercises.toml").read_text()
    for ex_id, ex in EXERCISES.items():
        for path in {make.split_target(t)[0] for t in ex["targets"]}:
            assert make.marker(ex_id) in (out / path).read_text()
    assert compileall.compile_dir(out, quiet=1, legacy=False, force=True)
    assert check.still_stripped(out, EXERCISES) == list(EXERCISES)


def test_an_exercise_copy_holds_neither_the_answers_nor_the_mistakes_nor_a_private_list(tmp_path):
    private = ROOT / "course" / "private_test_list.toml"  # an instructor's list kept in the repo
    private.write_text(make.EXERCISES.read_text())
    try:
        out = tmp_path / "ex"
        assert make.main(["expert_choice_topk", "--mistake", "1", "--exercises", str(private),
                          "--out", str(out)]) == 0
    finally:
        private.unlink()
    assert not (out / "course" / "private_test_list.toml").exists()
    assert not (out / "course" / "INSTRUCTORS.md").exists()
    assert not (out / "tests" / "test_course.py").exists()
    copied = out / "course" / "exercises.toml"
    assert "[[exercise.mistakes]]" not in copied.read_text()
    assert list(make.load(copied)) == list(EXERCISES)  # check.py still reads it


# --- the kit against the code, running the checks ----------------------------------------------

def test_every_check_exists_and_passes_on_the_real_code_within_30_seconds():
    checks = sorted({c for ex in EXERCISES.values() for c in ex["checks"]})
    results = check.run_checks(ROOT, checks, time_limit=600)
    bad = {c: r for c, r in results.items() if r[0] != "passed"}
    assert not bad, "\n".join(f"{c}: {r[0]} {r[2][:500]}" for c, r in bad.items())
    slow = {c: r[1] for c, r in results.items() if r[1] > SECONDS_PER_CHECK}
    assert not slow, f"checks over {SECONDS_PER_CHECK} s: {slow}"


@pytest.mark.parametrize("ex_id", list(EXERCISES))
def test_every_check_fails_on_the_stripped_exercise_because_of_it(outcomes, ex_id):
    results = outcomes[ex_id, "stripped"]
    passed = [c for c, (outcome, _, _) in results.items() if outcome == "passed"]
    assert not passed, f"these checks pass without exercise {ex_id}: {passed}"
    other = [c for c, (_, _, message) in results.items() if f"exercise {ex_id}" not in message]
    assert not other, f"these checks fail for another reason than the stripped code: {other}"


@pytest.mark.parametrize("ex_id, n", MISTAKES, ids=[f"{e}-{n}" for e, n in MISTAKES])
def test_every_listed_mistake_is_caught_by_a_check(outcomes, ex_id, n):
    caught = [c for c, (outcome, _, _) in outcomes[ex_id, n].items() if outcome in CAUGHT]
    what = EXERCISES[ex_id]["mistakes"][n - 1]["what"]
    assert caught, f"no check catches mistake {n} of {ex_id}: {what}"


@pytest.mark.parametrize("ex_id", [e for e in EXERCISES if later(e)])
def test_every_exercise_passes_with_the_later_ones_still_stripped(outcomes, ex_id):
    """A handout is worked in the order of exercises.toml: no check may need a later exercise."""
    bad = {c: r[0] for c, r in outcomes[ex_id, "in order"].items() if r[0] != "passed"}
    assert not bad, f"{ex_id}'s checks need a later exercise's code: {bad}"
