"""experiments/: each script's smoke preset runs train.py end to end and writes its CSV and PNG,
under the scratch folder, never over the published results."""

import csv
import hashlib
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "experiments"))  # the scripts import their helper module `kit` as run from there

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def published_files():
    """{path: sha256} of the CSVs and figures the README shows."""
    paths = [*(REPO / "experiments" / "results").iterdir(), *(REPO / "assets").iterdir()]
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """The scratch folder (out-experiments/) moved to tmp_path; the published files must not change."""
    import kit
    monkeypatch.setattr(kit, "SCRATCH", tmp_path)
    before = published_files()
    yield tmp_path
    assert published_files() == before


def run_smoke(module, dataset, scratch):
    """The smoke preset with no folder flags: everything lands under <scratch>/smoke/."""
    argv = ["--preset=smoke", f"--dataset={dataset}"]
    module.main(argv)
    with open(scratch / "smoke" / "results" / f"{module.NAME}.csv") as f:
        rows = list(csv.DictReader(f))
    assert (scratch / "smoke" / "assets" / f"{module.NAME}.png").read_bytes()[:8] == PNG_MAGIC
    return rows, argv


def test_only_the_published_preset_writes_the_readme_results_and_says_so(scratch, capsys):
    import kit
    smoke = kit.parse_args("", {"smoke": {}, "cpu": {}}, ["--preset=smoke"])
    assert (smoke.results_dir, smoke.assets_dir) == (scratch / "smoke" / "results",
                                                     scratch / "smoke" / "assets")
    assert "only --preset cpu writes the published results" in capsys.readouterr().out
    published = kit.parse_args("", {"smoke": {}, "cpu": {}}, [])
    assert (published.results_dir, published.assets_dir) == (REPO / "experiments" / "results",
                                                             REPO / "assets")
    assert "the CSV and figure replace those in experiments/results/ and assets/" in capsys.readouterr().out


def test_isoflop_smoke_writes_one_row_per_run_and_a_png(dataset, scratch, capsys):
    import mod_isoflop
    rows, argv = run_smoke(mod_isoflop, dataset, scratch)
    assert len(rows) == 4 and {r["variant"] for r in rows} == {"baseline", "mod"}
    assert all(float(r["val_loss"]) > 0 and int(r["steps"]) > 0 for r in rows)
    mod_isoflop.main(argv)  # a second call finds every run finished and trains nothing
    assert capsys.readouterr().out.count("finished earlier, skipped") == 4
    assert all(float(r["train_loss"]) > 0 for r in rows)
    with open(scratch / "smoke" / "results" / "mod_isoflop_headline.csv") as f:
        heads = list(csv.DictReader(f))
    assert [h["mod_eval"] for h in heads] == ["causal", "top-k"]
    base = min((r for r in rows if r["variant"] == "baseline"), key=lambda r: float(r["val_loss"]))
    assert all(h["baseline"] == f"L{base['n_layer']}-d{base['n_embd']}" for h in heads)
    assert all(float(h["best_mod_flops_ratio"]) < 1 and float(h["best_mod_step_time_ratio"]) > 0
               for h in heads)
    for h in (h for h in heads if h["matching_mod"]):  # at or below the optimal baseline's loss
        assert float(h["matching_mod_loss"]) <= float(h["baseline_loss"])
        assert float(h["matching_mod_step_time_ratio"]) > 0


def test_isoflop_refuses_a_budget_below_one_training_step_in_one_line(dataset, scratch, capsys,
                                                                      monkeypatch):
    import mod_isoflop
    monkeypatch.setitem(mod_isoflop.PRESETS["smoke"], "budgets", {1e3: [(2, 2, 16)]})
    with pytest.raises(SystemExit) as stop:
        run_smoke(mod_isoflop, dataset, scratch)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "budget 1000 FLOPs" in err
    assert not (scratch / "smoke").exists()  # nothing written


def test_capacity_smoke_has_a_row_per_capacity_and_frequency_plus_the_baseline(dataset, scratch):
    import mod_capacity
    rows, _ = run_smoke(mod_capacity, dataset, scratch)
    assert len(rows) == 1 + 2 * 2
    mod = [r for r in rows if r["variant"] == "mod"]
    assert {(r["capacity"], r["route_every"]) for r in mod} == {("0.25", "1"), ("0.25", "2"), ("1.0", "1"), ("1.0", "2")}
    cheap, full = (next(r for r in mod if r["capacity"] == c and r["route_every"] == "1") for c in ("0.25", "1.0"))
    assert int(cheap["steps"]) > int(full["steps"])  # equal FLOPs: the cheaper model takes more steps


def test_routing_smoke_draws_the_routing_figure_of_a_trained_model(dataset, scratch):
    import mod_routing
    rows, _ = run_smoke(mod_routing, dataset, scratch)
    assert len(rows) == 1 and float(rows[0]["routed_frac_passage_topk"]) == pytest.approx(0.125)


def test_decode_smoke_measures_speed_and_kv_bytes_of_every_model(dataset, scratch):
    import mod_decode
    rows, _ = run_smoke(mod_decode, dataset, scratch)
    assert [r["run"] for r in rows] == ["baseline", "mod-C0.25", "mod-C1.0"]
    assert all(float(r["decode_tokens_per_s"]) > 0 and int(r["kv_cache_bytes"]) > 0 for r in rows)
    kv = {r["run"]: int(r["kv_cache_bytes"]) for r in rows}
    assert kv["mod-C1.0"] <= kv["baseline"]  # a skipped block writes no key


def test_router_tuning_frontier_smoke_tunes_on_its_own_dense_model(dataset, scratch):
    import rt_frontier
    rows, _ = run_smoke(rt_frontier, dataset, scratch)
    assert [r["run"] for r in rows] == ["dense", "sequence-attn-t0.5-s1337", "sequence-block-t0.5-s1337",
                                        "static-attn-drop1", "static-attn-drop2", "static-block-drop1",
                                        "static-block-drop2"]
    assert all(0 <= float(r["val_capacity"]) <= 1 for r in rows[1:])
    static = {r["run"]: r for r in rows if r["run"].startswith("static")}
    assert float(static["static-attn-drop2"]["val_capacity"]) == 0  # both gated layers closed for every input
    assert float(static["static-attn-drop1"]["val_loss"]) != float(rows[0]["val_loss"])  # dropping changed the model
    assert float(rows[0]["forward_time_vs_dense"]) == 1.0 and all(float(r["forward_time_vs_dense"]) > 0 for r in rows)


def test_mom_two_stage_smoke_compares_two_stage_scratch_and_dense_from_one_stage_one(dataset, scratch):
    import mom_two_stage
    rows, _ = run_smoke(mom_two_stage, dataset, scratch)
    assert [r["run"] for r in rows] == ["stage1-dense", "dense-continued", "two-stage-mom-fresh-routers",
                                        "two-stage-mom-layer-order-routers", "mom-from-scratch"]
    assert all(int(r["total_steps"]) == 16 for r in rows[1:])  # stage 2 starts where stage 1 stopped
    stage1 = str(scratch / "smoke" / "mom_two_stage" / "stage1-dense")
    assert rows[1]["init_from"] == rows[2]["init_from"] == stage1


def test_mom_configs_smoke_trains_every_named_setting_from_one_dense_model(dataset, scratch):
    import mom_configs
    rows, _ = run_smoke(mom_configs, dataset, scratch)
    assert [r["run"] for r in rows] == ["dense-continued"] + [name for name, _ in mom_configs.SETTINGS]
    efficient = next(r for r in rows if r["run"].startswith("mom-efficient"))
    assert (efficient["assembly_steps"], efficient["modules_per_step"]) == ("1", "2")  # L = 2 in the smoke preset


def test_rt_cost_smoke_tunes_one_epoch_per_sample_count(dataset, scratch):
    import rt_cost
    rows, _ = run_smoke(rt_cost, dataset, scratch)
    assert [r["run"] for r in rows] == ["dense", "samples8-s1337", "samples32-s1337"]
    assert [int(r["steps"]) for r in rows[1:]] == [2, 8]  # one epoch of 8 and 32 windows, 4 per step


def test_mom_routing_smoke_draws_which_module_each_token_took(dataset, scratch):
    import mom_routing
    rows, _ = run_smoke(mom_routing, dataset, scratch)
    assert len(rows) == 1 and rows[0]["run"] == "two-stage-mom-fresh-routers"
    skips = [float(v) for k, v in rows[0].items() if k.endswith("_skip")]
    assert len(skips) == 2 * 2 and all(0 <= s <= 1 for s in skips)  # 2 pools x H = 2 steps in the smoke preset


def test_an_unknown_preset_is_refused_in_one_line(capsys):
    import mod_isoflop
    with pytest.raises(SystemExit) as stop:
        mod_isoflop.main(["--preset=nope"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "--preset" in err


def test_step_floor_smoke_splits_the_mod_step_and_scores_it_against_its_ceiling(dataset, scratch):
    import mod_step_floor
    rows, _ = run_smoke(mod_step_floor, dataset, scratch)
    assert [r["size"] for r in rows] == ["L2-d16"]
    row = {k: float(v) for k, v in rows[0].items() if k != "size"}
    assert all(row[f"{part}_ms"] > 0 for part in ("baseline", "mod", "unrouted", "routed"))
    assert row["flop_ceiling"] > 1  # a routed block costs less than a dense one
    assert row["of_ceiling"] == pytest.approx(row["baseline_ms"] / row["mod_ms"] / row["flop_ceiling"])
    assert row["needed_ms"] * 0.85 * row["flop_ceiling"] == pytest.approx(row["baseline_ms"])
