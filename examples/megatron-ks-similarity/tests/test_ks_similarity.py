import numpy as np

from megatron.types import ImageRecord, Task
from megatron_ks_similarity import plugin


def constant_task(name: str, value: int, n: int = 3) -> Task:
    records = [ImageRecord(i, None, 8, 8, np.zeros((0, 4)), np.zeros(0)) for i in range(n)]
    return Task(name, ["x"], records, image_loader=lambda r: np.full((8, 8), value, np.uint8))


def test_registered_and_usable_by_name(make_plugin_manager):
    pm = make_plugin_manager(plugin, builtins=False)
    metric = pm.registers["similarity"].get("ks-intensity")()
    a, b = constant_task("a", 100), constant_task("b", 200)
    assert metric.distance(metric.summarize(a), metric.summarize(a)) == 0.0
    # all mass at 100 vs all mass at 200: the CDFs differ by 1 between the two levels
    assert metric.distance(metric.summarize(a), metric.summarize(b)) == 1.0
