"""megatron.benchmark.grid with a fake runner: grid expansion, cell configs, resume, workers, shards, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import _benchmark_fakes as fakes
from megatron.benchmark import grid as bm
from megatron.cli import main
from megatron.config import ExperimentConfig
from megatron.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "benchmarks"


def make(grid: dict, base: dict | None = None):
    base = base or {"data": {"sources": fakes.SOURCES}, "training": {"meta_epochs": 3}}
    return bm.load_benchmark_config(None, grid, base_overrides=None)[0], {**base}


def rows(out: Path) -> list[dict]:
    data = json.loads((out / "results.json").read_text())
    return sorted(({k: v for k, v in r.items() if k != "wall_s"} for r in data), key=lambda r: r["cell_id"])


@pytest.fixture(autouse=True)
def _clear_calls():
    fakes.CALLS.clear()


def test_grid_expansion_counts_and_baseline_added():
    bcfg, base = make({"learners": ["reptile"], "seeds": [0, 1, 2], "n_sources": [2, 3, "all"], "shots": [20, 40],
                       "selection": ["random", "closest"], "budget": 1000, "controls": False})
    plan = bm.expand_grid(bcfg, base)
    # per learner: N=2 and N=3 x 2 selections + N=all once = 5 settings; x 2 shots x 3 seeds = 30; x 2 learners
    assert len(plan.cells) == 60
    assert {c.learner for c in plan.cells} == {"reptile", "finetune"}
    assert any("finetune" in n for n in plan.notes)
    assert len({c.id for c in plan.cells}) == 60
    assert [c.index for c in plan.cells] == list(range(60))
    with_lrs = bm.expand_grid(make({"learners": ["reptile", "finetune"], "seeds": [0, 1, 2, 3, 4], "lrs": [1e-3, 1e-2],
                                    "budget": 10, "controls": False})[0], base)
    assert len(with_lrs.cells) == 2 * 2 * 5 and not with_lrs.notes


def test_random_subsets_are_per_seed_and_shared_by_learners():
    bcfg, base = make({"learners": ["reptile"], "seeds": [0, 1, 2, 3], "n_sources": [3], "budget": 10})
    cells = bm.expand_grid(bcfg, base).cells
    by_seed = {}
    for c in cells:
        assert len(c.sources) == 3 and set(c.sources) <= set(fakes.SOURCES)
        by_seed.setdefault(c.seed, set()).add(c.sources)
    assert all(len(s) == 1 for s in by_seed.values())  # reptile and finetune of a seed see the same tasks
    assert len({next(iter(s)) for s in by_seed.values()}) > 1  # seeds differ
    assert bm.random_subset(fakes.SOURCES, 3, 0) == bm.random_subset(list(fakes.SOURCES), 3, 0)


def test_cell_config_equal_compute_no_runner_baseline(tmp_path):
    bcfg, base = make({"learners": ["reptile"], "seeds": [0], "n_sources": [2], "shots": [40], "lrs": [0.01],
                       "selection": ["closest"], "budget": 1234})
    plan = bm.expand_grid(bcfg, base)
    cell = next(c for c in plan.cells if c.learner == "reptile")
    cfg = bm.cell_config(cell, plan.base, tmp_path, bcfg.grid.lr_keys)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.training.compute_budget == 1234 and cfg.output.compare_baseline is False
    assert cfg.data.shots == 40 and cfg.training.outer_lr == 0.01 and cfg.training.finetune_lr == 0.01
    # the runner ranks the base config's source tasks and keeps the closest 2
    assert cfg.similarity.select_sources == 2 and cfg.data.sources == fakes.SOURCES
    assert cfg.output.dir == tmp_path / "cells" and cfg.output.name == cell.id


def test_finetune_epochs_scale_with_one_over_k_so_every_k_gets_the_same_passes(tmp_path):
    bcfg, base = make({"learners": ["reptile"], "seeds": [0], "shots": [10, 20, 40], "budget": 1234})
    plan = bm.expand_grid(bcfg, base)
    ref = ExperimentConfig.model_validate(plan.base)
    passes = {}
    for cell in (c for c in plan.cells if c.learner == "reptile"):
        cfg = bm.cell_config(cell, plan.base, tmp_path, bcfg.grid.lr_keys, finetune_per_image=True)
        passes[cell.shots] = cfg.training.finetune_epochs * cell.shots
        unscaled = bm.cell_config(cell, plan.base, tmp_path, bcfg.grid.lr_keys)
        assert unscaled.training.finetune_epochs == ref.training.finetune_epochs
    assert len(set(passes.values())) == 1 and passes[ref.data.shots] == ref.training.finetune_epochs * ref.data.shots


def test_budget_derived_from_schedule_or_error():
    base = ExperimentConfig.model_validate({"training": {"meta_epochs": 2, "source_epochs": 3, "steps_per_epoch": 5,
                                                          "meta_batch": 2, "finetune_epochs": 4},
                                            "episodes": {"support_size": 4, "query_size": 4}})
    budget, note = bm.derive_budget(base, shots=20)
    assert budget == 2 * 2 * (3 * 5 * 2 * 8 + 4 * 20) == 1280
    assert "1,280" in note
    with pytest.raises(ConfigError, match="budget"):
        bm.derive_budget(ExperimentConfig(), shots=20)
    bcfg, b = make({"learners": ["reptile"], "seeds": [0]}, {"data": {"sources": fakes.SOURCES},
                                                            "training": {"compute_budget": 777}})
    assert bm.expand_grid(bcfg, b).budget == 777


def test_bad_grid_errors_name_the_problem():
    with pytest.raises(ConfigError, match="N=9"):
        bm.expand_grid(*make({"n_sources": [9], "budget": 1}))
    with pytest.raises(ConfigError, match="unique"):
        bm.expand_grid(*make({"learners": ["reptile", {"name": "maml", "label": "reptile"}], "budget": 1}))
    with pytest.raises(ConfigError, match="grid.bogus|unknown key"):
        bm.load_benchmark_config(None, {"bogus": 1})


def test_run_then_resume_skips_finished_and_resumes_killed(tmp_path, monkeypatch):
    bcfg, base = make({"learners": ["reptile"], "seeds": [0, 1], "budget": 600, "controls": False})
    plan = bm.expand_grid(bcfg, base)
    victim = plan.cells[1].id
    fakes.KILL_AT[0] = victim
    with pytest.raises(fakes.Killed):
        bm.run_benchmark(bcfg, base, tmp_path, runner=fakes.killing_runner, progress=False)
    assert [c for c, _ in fakes.CALLS] == [plan.cells[0].id, victim]
    fakes.CALLS.clear()
    monkeypatch.setattr(bm, "run_cell_experiment", fakes.fake_runner)  # the default path, patched
    res = bm.run_benchmark(bcfg, base, tmp_path, progress=False)
    called = dict(fakes.CALLS)
    assert plan.cells[0].id not in called  # finished: not run again
    assert called[victim] is True  # killed mid-run: resumed through the runner
    assert all(called[c.id] is False for c in plan.cells[2:])
    assert res.skipped == [plan.cells[0].id] and len(res.ran) == 3
    fakes.CALLS.clear()
    again = bm.run_benchmark(bcfg, base, tmp_path, progress=False)
    assert fakes.CALLS == [] and len(again.skipped) == 4
    assert len(rows(tmp_path)) == 4 and (tmp_path / "report.md").exists()
    fresh = bm.run_benchmark(bcfg, base, tmp_path, progress=False, resume=False, report=False)
    assert len(fresh.ran) == 4 and all(res is False for _, res in fakes.CALLS)


def test_prune_checkpoints_of_complete_cells(tmp_path):
    bcfg, base = make({"learners": ["reptile"], "seeds": [0], "budget": 600})
    bm.run_benchmark(bcfg, base, tmp_path / "keep", runner=fakes.fake_runner, progress=False, report=False)
    assert (tmp_path / "keep" / "cells" / "reptile__nall__k20__all__s0" / "checkpoints" / "reptile" / "last.pt").exists()
    bm.run_benchmark(bcfg, base, tmp_path / "prune", runner=fakes.fake_runner, progress=False, report=False,
                     prune_checkpoints=True)
    cell = tmp_path / "prune" / "cells" / "reptile__nall__k20__all__s0"
    assert (cell / "run.json").exists() and not (cell / "checkpoints").exists()


def test_changed_cell_definition_is_refused(tmp_path):
    bcfg, base = make({"learners": ["reptile"], "seeds": [0], "budget": 600})
    bm.run_benchmark(bcfg, base, tmp_path, runner=fakes.fake_runner, progress=False, report=False)
    bcfg2, _ = make({"learners": ["reptile"], "seeds": [0], "budget": 900})
    with pytest.raises(ConfigError, match="budget"):
        bm.run_benchmark(bcfg2, base, tmp_path, runner=fakes.fake_runner, progress=False)


def test_failed_cell_is_recorded_and_others_run(tmp_path):
    bcfg, base = make({"learners": ["reptile"], "seeds": [0, 1], "budget": 600, "controls": False})
    res = bm.run_benchmark(bcfg, base, tmp_path, runner=fakes.failing_runner, progress=False)
    assert list(res.failed) == ["reptile__nall__k20__all__s1"] and "nan" in res.failed["reptile__nall__k20__all__s1"]
    assert len(res.ran) == 3
    assert (tmp_path / "cells" / "reptile__nall__k20__all__s1" / "error.txt").exists()
    assert "Cells not complete" in (tmp_path / "report.md").read_text()


def test_workers_give_the_same_results_as_serial(tmp_path):
    grid = {"learners": ["reptile"], "seeds": [0, 1], "n_sources": [2, "all"], "budget": 600, "controls": False}
    bcfg, base = make(grid)
    bm.run_benchmark(bcfg, base, tmp_path / "serial", runner=fakes.fake_runner, progress=False, report=False)
    from megatron.benchmark.report import write_results, load_rows

    write_results(load_rows([tmp_path / "serial"]).rows, tmp_path / "serial")
    res = bm.run_benchmark(bcfg, base, tmp_path / "par", runner=fakes.fake_runner, workers=2, progress=False,
                           cores=2, report=False)
    write_results(load_rows([tmp_path / "par"]).rows, tmp_path / "par")
    assert not res.failed and len(res.ran) == 8
    strip = lambda rs: [{k: v for k, v in r.items() if k != "epochs"} | {"epochs": r["epochs"]} for r in rs]  # noqa: E731
    assert strip(rows(tmp_path / "serial")) == strip(rows(tmp_path / "par"))


def test_shards_partition_the_grid_and_merge(tmp_path):
    bcfg, base = make({"learners": ["reptile"], "seeds": [0, 1], "budget": 600})
    n_cells = len(bm.expand_grid(bcfg, base).cells)
    ran = []
    for i in range(3):
        res = bm.run_benchmark(bcfg, base, tmp_path / f"shard{i}", runner=fakes.fake_runner, shard=(i, 3),
                               progress=False, report=False)
        ran += res.ran
    assert sorted(ran) == sorted(c.id for c in bm.expand_grid(bcfg, base).cells) and len(ran) == n_cells
    assert main(["report", *(str(tmp_path / f"shard{i}") for i in range(3)), "--out", str(tmp_path / "all")]) == 0
    assert len(rows(tmp_path / "all")) == n_cells
    with pytest.raises(ConfigError, match="shard"):
        bm.parse_shard("3")
    with pytest.raises(ConfigError, match="shard"):
        bm.run_benchmark(bcfg, base, tmp_path / "x", runner=fakes.fake_runner, shard=(3, 3), progress=False)


def test_cli_dry_run_and_run(tmp_path, monkeypatch, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text("description: test grid\nbase:\n  data:\n    sources: [a, b, c]\ngrid:\n  learners: [reptile]\n"
                    "  seeds: [0, 1]\n  budget: 500\n")
    assert main(["benchmark", "-c", str(grid), "--n-sources", "2,all", "--shots", "20,40", "--dry-run"]) == 0
    out = capsys.readouterr().out
    # 2 learners x 4 settings x 2 seeds, and the 2 controls x 2 seeds in the first setting (N=2, K=20)
    assert "20 cells" in out and "reptile__n2__k40__random__s1" in out
    assert "finetune_scratch__n2__k20__random__s0" in out and "positive control" in out
    assert main(["benchmark", "-c", str(grid), "--n-sources", "2,all", "--shots", "20,40", "--dry-run",
                 "--no-controls"]) == 0
    out = capsys.readouterr().out
    assert "16 cells" in out and "finetune_scratch" not in out
    monkeypatch.setattr(bm, "run_cell_experiment", fakes.fake_runner)
    assert main(["benchmark", "-c", str(grid), "--out", str(tmp_path / "o"), "--no-progress",
                 "--set", "training.finetune_epochs=2"]) == 0
    assert len(rows(tmp_path / "o")) == 8  # reptile, finetune and the two controls, 2 seeds
    assert "## Power check" in (tmp_path / "o" / "report.md").read_text()
    cfg = json.loads((tmp_path / "o" / "cells" / "reptile__nall__k20__all__s0" / "run.json").read_text())["config"]
    assert cfg["training"]["finetune_epochs"] == 2 and cfg["output"]["compare_baseline"] is False
    with pytest.raises(SystemExit):
        main(["benchmark", "--seeds", "0,x"])


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_grids_load_and_expand(path):
    bcfg, base = bm.load_benchmark_config(path)
    plan = bm.expand_grid(bcfg, base)  # the base lists its sources: nothing is loaded
    assert plan.cells and any(c.learner == "finetune" for c in plan.cells)
    assert len(bcfg.grid.seeds) >= 5 and bcfg.grid.controls
    assert {c.control for c in plan.cells} == {None, "positive", "negative"}
    for c in plan.cells[:3] + [c for c in plan.cells if c.control][:2]:
        bm.cell_config(c, plan.base, Path("/tmp/x"), bcfg.grid.lr_keys)


def test_examples_exist():
    names = {p.name for p in EXAMPLES.glob("*.yaml")}
    assert {"lr_study.yaml", "n_tasks.yaml", "vs_incremental.yaml", "few_shot.yaml", "source_choice.yaml"} <= names
    assert (EXAMPLES / "README.md").exists()


# --- the power check's controls ------------------------------------------------------------------------
def test_default_grid_has_five_seeds_and_controls():
    bcfg, base = bm.load_benchmark_config(None, {"budget": 10})
    assert bcfg.grid.seeds == [0, 1, 2, 3, 4] and bcfg.grid.controls
    few = bm.expand_grid(*make({"seeds": [0, 1, 2], "budget": 10}))
    assert any("fewer than 5" in n for n in few.notes)


def test_controls_are_the_baseline_from_random_weights_and_an_independent_replicate(tmp_path):
    grid = {"learners": ["reptile", {"name": "finetune", "options": {"episodes_per_step": 2}}], "seeds": [0, 1, 2],
            "n_sources": ["all", 2], "shots": [20, 40], "budget": 900}
    base = {"data": {"sources": fakes.SOURCES}, "detector": {"checkpoint": "/ckpt/stage1.pth"},
            "training": {"meta_epochs": 3, "replicate": 2}}
    bcfg, _ = bm.load_benchmark_config(None, grid)
    plan = bm.expand_grid(bcfg, base)
    plain = bm.expand_grid(bm.load_benchmark_config(None, {**grid, "controls": False})[0], base)
    # the other cells keep their indices (and shards): the controls come last, in the first setting only
    assert plan.cells[:len(plain.cells)] == plain.cells
    controls = plan.cells[len(plain.cells):]
    assert [(c.learner, c.control) for c in controls] == [("finetune_scratch", "positive")] * 3 + [
        ("finetune_aa", "negative")] * 3
    assert {(c.n_sources, c.shots, c.selection) for c in controls} == {(None, 20, "all")}
    assert [c.seed for c in controls] == [0, 1, 2, 0, 1, 2]
    scratch = bm.cell_config(controls[0], plan.base, tmp_path, bcfg.grid.lr_keys)
    aa = bm.cell_config(controls[3], plan.base, tmp_path, bcfg.grid.lr_keys)
    pretrained = bm.cell_config(next(c for c in plain.cells if c.learner == "finetune" and c.seed == 0), plan.base,
                                tmp_path, bcfg.grid.lr_keys)
    assert pretrained.detector.checkpoint is not None and pretrained.training.replicate == 2
    assert scratch.learner.name == "finetune" and scratch.training.pretrain_epochs == 0
    assert scratch.detector.checkpoint is None  # random weights: no checkpoint, no stage 1
    assert aa.training.replicate == 3 and aa.detector.checkpoint == pretrained.detector.checkpoint
    for cfg in (scratch, aa):  # the same baseline (its options), the same budget, seed and split
        assert cfg.learner.options == {"episodes_per_step": 2}
        assert cfg.training.compute_budget == pretrained.training.compute_budget == 900
        assert cfg.seed == pretrained.seed and cfg.data.shots == pretrained.data.shots
        assert cfg.data.eval_images == pretrained.data.eval_images
    everywhere = bm.expand_grid(bm.load_benchmark_config(None, {**grid, "control_settings": "all"})[0], base)
    assert sum(c.control is not None for c in everywhere.cells) == 2 * 4 * 3  # 2 controls x 4 settings x 3 seeds
    # the cell definition records the control, so a changed one is refused on resume
    assert controls[0].to_dict()["control"] == "positive"
    assert controls[0].to_dict()["overrides"] == {"training.pretrain_epochs": 0, "detector.checkpoint": None}


def test_no_positive_control_when_the_base_already_starts_from_random_weights():
    plan = bm.expand_grid(*make({"seeds": [0, 1], "budget": 10},
                                {"data": {"sources": fakes.SOURCES}, "training": {"pretrain_epochs": 0}}))
    assert {c.control for c in plan.cells if c.control} == {"negative"}
    assert any("positive control (finetune_scratch) left out" in n for n in plan.notes)


def test_control_labels_are_reserved_and_overrides_stay_off_the_grid_keys():
    with pytest.raises(ConfigError, match="finetune_aa is reserved"):
        bm.expand_grid(*make({"learners": [{"name": "finetune", "label": "finetune_aa"}], "budget": 1}))
    with pytest.raises(ConfigError, match="seed.*set by the grid"):
        bm.expand_grid(*make({"learners": [{"name": "reptile", "label": "r", "overrides": {"seed": 3}}], "budget": 1}))
    plan = bm.expand_grid(*make({"learners": [{"name": "reptile", "label": "r5",
                                               "overrides": {"training.inner_steps": 5}}], "seeds": [0], "budget": 1}))
    cell = next(c for c in plan.cells if c.learner == "r5")
    assert bm.cell_config(cell, plan.base, Path("/tmp/x"), ["outer_lr"]).training.inner_steps == 5


def test_cell_files_from_before_controls_still_resume(tmp_path):
    bcfg, base = make({"learners": ["reptile"], "seeds": [0], "budget": 600, "controls": False})
    bm.run_benchmark(bcfg, base, tmp_path, runner=fakes.fake_runner, progress=False, report=False)
    cell_file = tmp_path / "cells" / "reptile__nall__k20__all__s0" / "cell.json"
    old = json.loads(cell_file.read_text())
    del old["overrides"], old["control"]  # as written before variants had them
    cell_file.write_text(json.dumps(old))
    fakes.CALLS.clear()
    res = bm.run_benchmark(bcfg, base, tmp_path, runner=fakes.fake_runner, progress=False, report=False)
    assert "reptile__nall__k20__all__s0" in res.skipped and fakes.CALLS == []


# --- reuse of identical cells across grids; learning rates as multipliers of the base recipe ---------------------
def _fake_versions(cfg_json, pm=None):
    return {"megatron": "0.1.0", "torch": "2.x"}  # what the fake runner records


def test_reuse_takes_identical_cells_of_another_grid_and_runs_the_rest(tmp_path, monkeypatch):
    monkeypatch.setattr(bm, "_current_versions", _fake_versions)
    first, base = make({"learners": ["reptile"], "seeds": [0, 1], "budget": 600})
    bm.run_benchmark(first, base, tmp_path / "a", runner=fakes.fake_runner, progress=False, report=False)
    fakes.CALLS.clear()
    # the second grid shares reptile/finetune at every source task and its controls, and adds N = 2
    second, _ = make({"learners": ["reptile"], "seeds": [0, 1], "n_sources": [None, 2], "budget": 600})
    res = bm.run_benchmark(second, base, tmp_path / "b", runner=fakes.fake_runner, progress=False,
                           reuse=[tmp_path / "a"])
    shared = {c.id for c in bm.expand_grid(first, base).cells}
    assert set(res.reused) == shared and len(shared) == 8  # 2 learners + 2 controls, 2 seeds
    assert {name for name, _ in fakes.CALLS} == {c.id for c in res.plan.cells} - shared  # the N = 2 cells only
    rec = json.loads((tmp_path / "b" / "cells" / "reptile__nall__k20__all__s0" / "run.json").read_text())
    assert rec["reused_from"] == str(tmp_path / "a" / "cells" / "reptile__nall__k20__all__s0")
    same = json.loads((tmp_path / "a" / "cells" / "reptile__nall__k20__all__s0" / "run.json").read_text())
    assert rec["learners"] == same["learners"]
    assert "identical experiments taken from other grids" in (tmp_path / "b" / "report.md").read_text()
    # a rerun of the second grid finds its cells complete: nothing runs, nothing is re-copied
    fakes.CALLS.clear()
    again = bm.run_benchmark(second, base, tmp_path / "b", runner=fakes.fake_runner, progress=False, report=False,
                             reuse=[tmp_path / "a"])
    assert fakes.CALLS == [] and again.reused == {}


def test_reuse_needs_the_same_experiment_and_versions(tmp_path, monkeypatch):
    monkeypatch.setattr(bm, "_current_versions", _fake_versions)
    grid, base = make({"learners": ["reptile"], "seeds": [0], "budget": 600, "controls": False})
    bm.run_benchmark(grid, base, tmp_path / "a", runner=fakes.fake_runner, progress=False, report=False)
    other_budget, _ = make({"learners": ["reptile"], "seeds": [0], "budget": 700, "controls": False})
    res = bm.run_benchmark(other_budget, base, tmp_path / "b", runner=fakes.fake_runner, progress=False,
                           report=False, reuse=[tmp_path / "a"])
    assert res.reused == {} and len(res.ran) == 2
    # another output folder and cache are the same experiment; another torch is not
    moved = {**base, "data": {**base["data"], "cache_dir": str(tmp_path / "elsewhere")}}
    res = bm.run_benchmark(grid, moved, tmp_path / "c", runner=fakes.fake_runner, progress=False, report=False,
                           reuse=[tmp_path / "a"])
    assert len(res.reused) == 2 and res.ran == []
    monkeypatch.setattr(bm, "_current_versions", lambda cfg_json, pm=None: {"megatron": "0.1.0", "torch": "3.x"})
    res = bm.run_benchmark(grid, base, tmp_path / "d", runner=fakes.fake_runner, progress=False, report=False,
                           reuse=[tmp_path / "a"])
    assert res.reused == {} and len(res.ran) == 2
    with pytest.raises(ConfigError, match="no cells/ folder"):
        bm.run_benchmark(grid, base, tmp_path / "e", runner=fakes.fake_runner, progress=False, report=False,
                         reuse=[tmp_path / "nothing"])


def test_lr_scale_multiplies_each_base_rate(tmp_path):
    base = {"data": {"sources": fakes.SOURCES},
            "training": {"meta_epochs": 3, "inner_lr": 0.01, "outer_lr": 1e-4, "finetune_lr": 1e-3}}
    bcfg, base = make({"learners": ["reptile"], "seeds": [0], "lrs": [1, 0.3, 3], "lr_scale": True,
                       "lr_keys": ["inner_lr", "outer_lr", "finetune_lr"], "budget": 600}, base)
    plan = bm.expand_grid(bcfg, base)
    by_id = {c.id: c for c in plan.cells}
    assert "reptile__nall__k20__lrx0.3__all__s0" in by_id
    cfg = bm.cell_config(by_id["reptile__nall__k20__lrx0.3__all__s0"], plan.base, tmp_path, bcfg.grid.lr_keys)
    assert (cfg.training.inner_lr, cfg.training.outer_lr, cfg.training.finetune_lr) == (0.003, 3e-05, 0.0003)
    one = bm.cell_config(by_id["reptile__nall__k20__lrx1__all__s0"], plan.base, tmp_path, bcfg.grid.lr_keys)
    plain = bm.cell_config(bm.expand_grid(make({"learners": ["reptile"], "seeds": [0], "budget": 600}, base)[0],
                                          base).cells[0], plan.base, tmp_path, bcfg.grid.lr_keys)
    assert one.training == plain.training  # x1 is the base recipe itself, so --reuse can take it
    bm.run_benchmark(bcfg, base, tmp_path / "run", runner=fakes.fake_runner, progress=False)
    text = (tmp_path / "run" / "report.md").read_text()
    assert "N=all (6), K=20, lr ×0.3" in text and (tmp_path / "run" / "plots" / "lr_final.png").exists()
