"""`grid.pretrain_per_seed` (issue 25): each seed's cells start from their own stage-1 checkpoint
(`training.pretrain_seed` = the cell's seed), so the intervals over seeds include stage 1's variance; off by
default, when every cell shares the base config's stage 1."""
from __future__ import annotations

import _benchmark_fakes as fakes
from megatron.benchmark import grid as bm


def plan_configs(tmp_path, **grid):
    base = {"data": {"sources": fakes.SOURCES}, "training": {"meta_epochs": 3, "pretrain_seed": 7}}
    bcfg, base = bm.load_benchmark_config(None, {"learners": ["reptile"], "seeds": [0, 3], "budget": 100, **grid})[0], base
    plan = bm.expand_grid(bcfg, base)
    return [(c, bm.cell_config(c, plan.base, tmp_path, bcfg.grid.lr_keys)) for c in plan.cells]


def test_pretrain_per_seed_sets_each_cells_stage1_seed_to_its_seed(tmp_path):
    cells = plan_configs(tmp_path, pretrain_per_seed=True)
    assert cells and all(cfg.training.pretrain_seed == cell.seed for cell, cfg in cells)
    # learners and controls of one seed share that seed's stage 1: the paired comparison stays paired
    by_seed = {}
    for cell, cfg in cells:
        by_seed.setdefault(cell.seed, set()).add(cfg.training.pretrain_seed)
    assert by_seed == {0: {0}, 3: {3}}
    assert all(cell.to_dict()["overrides"]["training.pretrain_seed"] == cell.seed for cell, _ in cells)


def test_without_it_every_cell_shares_the_base_config_stage1(tmp_path):
    cells = plan_configs(tmp_path)
    assert {cfg.training.pretrain_seed for _, cfg in cells} == {7}
