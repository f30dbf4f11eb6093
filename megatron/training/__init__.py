"""Training: the staged runner, pre-training, the run record and plots, weights, distributed helpers."""
