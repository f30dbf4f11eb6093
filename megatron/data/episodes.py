"""Batches, episodes and the few-shot target split.

- :func:`load_batch` / :func:`iterate_batches`: decoded (cached), preprocessed, collated batches of a task,
  for fine-tuning and evaluation.
- :func:`split_target`: the target task -> (K-image training pool, held-out evaluation split). Nested pools
  and a K-independent held-out split, so K = 20 and K = 40 results are comparable (details there).
- :class:`EpisodeSampler`: support/query episodes, image-level K-shot by default or N-way K-shot with an
  explicit label remap; deterministic for a seed, and its RNG state round-trips for exact resume.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from megatron.data.preprocess import Preprocessor, collate
from megatron.errors import DataError
from megatron.types import Batch, Episode, ImageRecord, Task
from megatron.runtime.distributed import shard as shard_list

log = logging.getLogger(__name__)

#: the smallest held-out split :func:`split_target` accepts when it chooses the split size itself
MIN_EVAL_IMAGES = 5
#: the largest K whose pool is reserved out of the evaluation split by default (the method compares K=20, 40)
RESERVED_SHOTS = 40


def _check_not_empty(task: Task, what: str) -> None:
    if len(task) == 0:
        raise DataError(
            f"task {task.name!r} ({task.source or 'no source'}) has no images, so it cannot be used for {what}; "
            "check the dataset path/annotation file, or remove the task from data.datasets / data.sources"
        )


def load_batch(task: Task, indices: Sequence[int], pre: Preprocessor, rng: np.random.Generator | None = None) -> Batch:
    """``task.records[i]`` for ``i`` in ``indices``: decoded (through ``pre``'s cache), preprocessed, collated.

    Augmented when ``pre.augment`` and an ``rng`` is given.
    """
    _check_not_empty(task, "a batch")
    if len(indices) == 0:
        raise ValueError(f"load_batch on task {task.name!r}: no indices given")
    samples = []
    for i in indices:
        record = task.records[int(i)]
        img = pre.decode(task, record)
        samples.append(pre.transform(img, record.boxes, record.labels, (record.height, record.width), rng,
                                     record.image_id, task.name))
    return collate(samples)


def iterate_batches(task: Task, batch_size: int, pre: Preprocessor, rng: np.random.Generator | None = None,
                    shuffle: bool = False) -> Iterator[Batch]:
    """Every image of ``task`` once, in batches of ``batch_size`` (the last one may be smaller).

    ``shuffle`` needs an ``rng`` (the order is drawn from it, so it is reproducible). Batches are augmented
    when ``pre.augment`` and an ``rng`` is given: for evaluation pass ``rng=None`` (or use
    ``pre.without_augment()``, which shares the decoded-image cache).
    """
    _check_not_empty(task, "training or evaluation")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if shuffle and rng is None:
        raise ValueError("iterate_batches(shuffle=True) needs an rng so the order is reproducible")
    order = rng.permutation(len(task)) if shuffle else np.arange(len(task))
    for start in range(0, len(order), batch_size):
        yield load_batch(task, order[start:start + batch_size], pre, rng)


# -- the target split -----------------------------------------------------------------------------------

def _stratified_pick(rng: np.random.Generator, strata: list[np.ndarray], count: int) -> list[int]:
    """``count`` items spread over ``strata`` in proportion to their sizes (largest remainder), random within."""
    total = sum(len(s) for s in strata)
    exact = [count * len(s) / total for s in strata]
    take = [int(e) for e in exact]
    for j in sorted(range(len(strata)), key=lambda j: exact[j] - take[j], reverse=True)[: count - sum(take)]:
        take[j] += 1
    picked: list[int] = []
    for s, k in zip(strata, take):
        picked.extend(int(x) for x in rng.permutation(s)[:k])
    return picked


def _either(fixes: list[str]) -> str:
    """``["a", "b", "c"]`` -> ``"a, b, or c"``: the possible fixes of a split that does not fit."""
    return fixes[0] if len(fixes) == 1 else ", ".join(fixes[:-1]) + ", or " + fixes[-1]


def split_target(task: Task, shots: int, eval_images: int | None, seed: int, *,
                 reserve: int = RESERVED_SHOTS, min_eval_images: int = MIN_EVAL_IMAGES) -> tuple[Task, Task]:
    """Split the few-shot target into ``(pool, held_out)``: a ``shots``-image training pool and an evaluation
    split no training step may see. Deterministic for ``seed``.

    How, and why:

    1. **Held-out first, independent of K.** Its size is ``eval_images`` when given, otherwise every image
       outside the first ``max(shots, reserve)`` (``reserve`` = 40, the method's largest K) — capped so at
       least ``min_eval_images`` remain. It is drawn stratified (images with findings / without, in the
       task's proportions) from a seeded generator, so for one seed it is *the same images for every
       K <= reserve*: K = 20 and K = 40 numbers are measured on identical evaluation data.
    2. **Nested pools.** The remaining images are put in one seeded order and the pool is its first K, so
       the K = 20 pool is a subset of the K = 40 pool (same seed): a K comparison changes only how much
       data there is, not which. With ``eval_images=None`` and K = 20, the 20 images reserved for K = 40
       are in neither split.
    3. **Findings first, empties proportionally.** The order interleaves the two strata so that every
       prefix of length k holds ``floor(k * f)`` no-finding images (f: the task's no-finding fraction):
       the pool keeps negatives in proportion, rounded down in favour of annotated images (a few-shot
       pool should not waste its K on empty images by chance).

    Both returned tasks keep the task's name, categories and loader (so they share decoded-image cache
    entries); the held-out records stay in the task's order. Errors: :class:`DataError` with the numbers
    and the fix when K does not fit.
    """
    _check_not_empty(task, "a few-shot target")
    n = len(task)
    if shots < 1:
        raise DataError(f"target task {task.name!r}: shots (K) must be >= 1, got {shots}; set data.shots")
    if eval_images is not None and eval_images < 1:
        raise DataError(f"target task {task.name!r}: eval_images must be >= 1, got {eval_images}; set data.eval_images")
    ids = [r.image_id for r in task.records]
    if len(set(ids)) != n:
        dupes = sorted({i for i in ids if ids.count(i) > 1})[:10]
        raise DataError(f"target task {task.name!r}: image ids repeat ({dupes}); the split needs unique image ids, "
                        "fix the annotation file")
    if eval_images is not None:
        n_eval = eval_images
        if shots + n_eval > n:
            fixes = []
            if n - n_eval >= 1:
                fixes.append(f"lower data.shots to at most {n - n_eval}")
            if n - shots >= 1:
                fixes.append(f"lower data.eval_images to at most {n - shots}")
            fixes.append(f"add at least {shots + n_eval - n} image(s) to the target")
            raise DataError(
                f"target task {task.name!r} has {n} images: a pool of K={shots} plus {n_eval} held-out images "
                f"(data.shots + data.eval_images) needs {shots + n_eval}; fix: {_either(fixes)}"
            )
    else:
        if shots > n - min_eval_images:
            fixes = []
            if n - min_eval_images >= 1:
                fixes.append(f"lower data.shots to at most {n - min_eval_images}")
            if n - shots >= 1:
                fixes.append(f"set data.eval_images to at most {n - shots} (a smaller held-out split than the "
                             f"default minimum of {min_eval_images})")
            fixes.append(f"add at least {shots + min_eval_images - n} image(s) to the target")
            raise DataError(
                f"target task {task.name!r} has {n} images: K={shots} (data.shots) leaves "
                f"{max(n - shots, 0)} for the held-out evaluation split, which needs at least {min_eval_images} "
                f"when data.eval_images is not set; fix: {_either(fixes)}"
            )
        n_eval = n - min(max(shots, reserve), n - min_eval_images)

    rng = np.random.default_rng(seed)
    has_finding = np.array([len(r.boxes) > 0 for r in task.records])
    findings, empties = np.flatnonzero(has_finding), np.flatnonzero(~has_finding)
    held = sorted(_stratified_pick(rng, [findings, empties], n_eval))
    held_set = set(held)
    rest_f = [int(i) for i in rng.permutation(findings) if int(i) not in held_set]
    rest_e = [int(i) for i in rng.permutation(empties) if int(i) not in held_set]
    empty_fraction = len(empties) / n
    order: list[int] = []
    n_empty = 0
    fi = ei = 0
    while fi < len(rest_f) or ei < len(rest_e):
        want_empty = n_empty < int((len(order) + 1) * empty_fraction + 1e-9)
        if (want_empty and ei < len(rest_e)) or fi >= len(rest_f):
            order.append(rest_e[ei])
            ei += 1
            n_empty += 1
        else:
            order.append(rest_f[fi])
            fi += 1
    pool = task.subset(order[:shots])
    held_out = task.subset(held)
    log.info("target %r: pool of %d images (%d without findings), %d held out, seed %d",
             task.name, len(pool), sum(len(r.boxes) == 0 for r in pool.records), len(held_out), seed)
    return pool, held_out


# -- episodes ---------------------------------------------------------------------------------------------

class _ClassIndex:
    """Per task: class -> indices of the images holding at least one box of that class (cached by identity)."""

    def __init__(self) -> None:
        self._by_task: dict[int, tuple[weakref.ref, int, list[np.ndarray]]] = {}

    def get(self, task: Task) -> list[np.ndarray]:
        entry = self._by_task.get(id(task))
        if entry is not None and entry[0]() is task and entry[1] == len(task):
            return entry[2]
        per_class: list[list[int]] = [[] for _ in task.categories]
        for i, r in enumerate(task.records):
            for c in np.unique(r.labels):
                if not 0 <= c < len(per_class):
                    raise DataError(
                        f"task {task.name!r}, image {r.image_id} ({r.file_name or r.path}): label {int(c)} is not a "
                        f"class of the task (it has {len(per_class)}: 0..{len(per_class) - 1}); fix the annotation"
                    )
                per_class[int(c)].append(i)
        index = [np.array(v, dtype=np.int64) for v in per_class]
        self._by_task = {k: v for k, v in self._by_task.items() if v[0]() is not None}
        self._by_task[id(task)] = (weakref.ref(task), len(task), index)
        return index


class EpisodeSampler:
    """Draws episodes (a support and a query batch, no image in both) from tasks.

    Image level (default): ``support_size`` then ``query_size`` distinct images, uniformly, with all the
    task's classes. N-way K-shot (``n_way`` set): draw ``n_way`` of the task's classes (among those with
    enough annotated images), pick support images until each chosen class has at least ``k_shot``
    annotated images in the support (``k_shot`` defaults to ``max(1, support_size // n_way)``), then up to
    ``query_size`` further images holding a chosen class. Other classes' boxes are dropped (their lesions
    become background in that episode, the usual N-way compromise) and labels are remapped to ``0..N-1``
    in the order the classes were drawn: ``Episode.label_map`` maps task label -> episode label and
    ``Episode.categories`` names the episode's classes.

    One ``np.random.Generator`` (seeded) drives the choice of images and, when ``pre`` augments, one
    augmentation seed per episode (its images are augmented from a generator of their own), so
    ``state_dict()`` / ``load_state_dict()`` restore exactly the episodes a run would have drawn next. Drawing
    an episode and loading it are separate: :meth:`meta_batch` with ``shard`` draws the whole meta-batch (the
    same random numbers on every rank) but decodes only the rank's episodes, and an episode's pixels do not
    depend on which other episodes were loaded.
    """

    def __init__(self, support_size: int, query_size: int, pre: Preprocessor, seed: int,
                 n_way: int | None = None, k_shot: int | None = None):
        if support_size < 1 or query_size < 1:
            raise ValueError(f"support_size and query_size must be >= 1, got {support_size} and {query_size}")
        if n_way is not None and n_way < 1:
            raise ValueError(f"n_way must be >= 1, got {n_way}")
        if k_shot is not None and n_way is None:
            raise ValueError("k_shot needs n_way (N-way K-shot episodes)")
        if k_shot is not None and k_shot < 1:
            raise ValueError(f"k_shot must be >= 1, got {k_shot}")
        self.support_size = support_size
        self.query_size = query_size
        self.pre = pre
        self.seed = seed
        self.n_way = n_way
        self.k_shot = k_shot if k_shot is not None else (max(1, support_size // n_way) if n_way else None)
        self.rng = np.random.default_rng(seed)
        self.episodes_drawn = 0
        #: ``(task name, image id)`` of every support then query image of each episode of the last
        #: :meth:`meta_batch`, *all* ranks' episodes included, in order: what the run's draw log hashes, known
        #: without decoding the images a rank does not load
        self.last_drawn_ids: list[tuple[str, int]] = []
        self._class_index = _ClassIndex()

    # -- state ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The generator state (128-bit integers as strings, so it survives JSON and ``weights_only`` loads)."""
        return {"seed": self.seed, "episodes_drawn": self.episodes_drawn,
                "bit_generator": _encode(self.rng.bit_generator.state)}

    def load_state_dict(self, state: dict) -> None:
        bg = _decode(state["bit_generator"])
        if bg.get("bit_generator") != type(self.rng.bit_generator).__name__:
            raise ValueError(f"sampler state is for {bg.get('bit_generator')}, this sampler uses "
                             f"{type(self.rng.bit_generator).__name__}")
        self.rng.bit_generator.state = bg
        self.seed = state.get("seed", self.seed)
        self.episodes_drawn = int(state.get("episodes_drawn", 0))

    # -- drawing ----------------------------------------------------------------------------------------
    def episode(self, task: Task) -> Episode:
        """One episode of ``task``, drawn and loaded."""
        return self._load(task, self._draw(task))

    def meta_batch(self, tasks: list[Task], size: int, shard: Any | None = None) -> list[Episode]:
        """``size`` episodes, one per task; tasks drawn without replacement (whole permutations when
        ``size`` exceeds the number of tasks, so every task appears as evenly as possible).

        ``shard`` (a :class:`~megatron.runtime.distributed.DistEnv`, or anything with ``rank`` and
        ``world_size``): the whole meta-batch is drawn — the same random numbers on every rank, so ranks stay in
        step and resume exactly — but only this rank's episodes are loaded and returned: exactly
        ``distributed.shard(meta_batch(tasks, size), shard)`` (round robin; a :class:`ConfigError` naming
        ``training.meta_batch`` when ``size`` does not divide over the ranks), without decoding the other
        ranks' images.
        """
        if not tasks:
            raise DataError("meta_batch: no source tasks to draw episodes from; list at least one in data.sources")
        if size < 1:
            raise ValueError(f"meta_batch size must be >= 1, got {size}")
        picks: list[int] = []
        while len(picks) < size:
            picks.extend(int(i) for i in self.rng.permutation(len(tasks))[: size - len(picks)])
        draws = [self._draw(tasks[i]) for i in picks]
        self.last_drawn_ids = [(tasks[i].name, int(tasks[i].records[r].image_id))
                               for i, d in zip(picks, draws) for r in (*d.support, *d.query)]
        keep = range(size)
        if shard is not None:

            keep = shard_list(list(range(size)), shard)
        return [self._load(tasks[picks[j]], draws[j]) for j in keep]

    def _draw(self, task: Task) -> "_Draw":
        """The random part of an episode (its images, N-way classes, augmentation seed); nothing decoded."""
        _check_not_empty(task, "episodes")
        if self.n_way is None:
            support_idx, query_idx = self._image_level(task)
            chosen = None
        else:
            support_idx, query_idx, chosen = self._n_way(task)
        aug_seed = int(self.rng.integers(2**63)) if self.pre.augment else None
        self.episodes_drawn += 1
        return _Draw(support_idx, query_idx, chosen, aug_seed)

    def _load(self, task: Task, draw: "_Draw") -> Episode:
        """Decode, preprocess (augment) and collate a drawn episode."""
        rng = np.random.default_rng(draw.aug_seed) if draw.aug_seed is not None else None
        if draw.chosen is None:
            support = load_batch(task, draw.support, self.pre, rng)
            query = load_batch(task, draw.query, self.pre, rng)
            return Episode(task.name, support, query, list(task.categories), None)
        chosen = draw.chosen
        label_map = {int(c): j for j, c in enumerate(chosen)}
        used = sorted(set(draw.support) | set(draw.query))
        remapped = _remap(task, used, label_map, chosen)
        position = {orig: j for j, orig in enumerate(used)}
        support = load_batch(remapped, [position[i] for i in draw.support], self.pre, rng)
        query = load_batch(remapped, [position[i] for i in draw.query], self.pre, rng)
        return Episode(task.name, support, query, [task.categories[c] for c in chosen], label_map)

    def _image_level(self, task: Task) -> tuple[list[int], list[int]]:
        need = self.support_size + self.query_size
        if need > len(task):
            raise DataError(
                f"task {task.name!r} has {len(task)} images but an episode needs {need} distinct ones "
                f"(support {self.support_size} + query {self.query_size}); lower episodes.support_size / "
                "episodes.query_size or add images to the task"
            )
        drawn = [int(i) for i in self.rng.choice(len(task), need, replace=False)]
        return drawn[: self.support_size], drawn[self.support_size:]

    def _n_way(self, task: Task) -> tuple[list[int], list[int], list[int]]:
        n_way, k_shot = self.n_way, self.k_shot
        assert n_way is not None and k_shot is not None
        if n_way > len(task.categories):
            raise DataError(
                f"task {task.name!r} has {len(task.categories)} classes ({', '.join(task.categories)}) but "
                f"episodes.n_way is {n_way}; lower episodes.n_way to at most {len(task.categories)} or leave it "
                "unset for image-level episodes"
            )
        per_class = self._class_index.get(task)
        # a class is usable when it has k_shot images for the support and at least one more for the query
        eligible = [c for c, imgs in enumerate(per_class) if len(imgs) >= k_shot + 1]
        if len(eligible) < n_way:
            counts = ", ".join(f"{task.categories[c]}: {len(v)}" for c, v in enumerate(per_class))
            raise DataError(
                f"task {task.name!r}: {n_way}-way {k_shot}-shot episodes need {n_way} classes with at least "
                f"{k_shot + 1} annotated images each (k_shot for the support + 1 for the query), but only "
                f"{len(eligible)} qualify (annotated images per class: {counts}); lower episodes.n_way or "
                "episodes.k_shot, or annotate more images"
            )
        chosen = [int(c) for c in self.rng.choice(eligible, n_way, replace=False)]
        support: list[int] = []
        in_support: set[int] = set()
        for c in chosen:
            have = sum(1 for i in per_class[c] if int(i) in in_support)
            candidates = [int(i) for i in self.rng.permutation(per_class[c]) if int(i) not in in_support]
            for i in candidates[: max(0, k_shot - have)]:
                support.append(i)
                in_support.add(i)
        holding = np.unique(np.concatenate([per_class[c] for c in chosen]))
        rest = [int(i) for i in holding if int(i) not in in_support]
        if not rest:
            raise DataError(
                f"task {task.name!r}: after the {len(support)} support images no image with the chosen classes "
                f"({', '.join(task.categories[c] for c in chosen)}) is left for the query; lower episodes.k_shot "
                "or annotate more images"
            )
        query = [int(i) for i in self.rng.permutation(rest)[: self.query_size]]
        return support, query, chosen


@dataclass(frozen=True)
class _Draw:
    """What :meth:`EpisodeSampler._draw` decided: task-record indices of support and query, the N-way classes
    (``None``: image level) and the augmentation seed (``None``: not augmenting)."""

    support: list[int]
    query: list[int]
    chosen: list[int] | None
    aug_seed: int | None


def _remap(task: Task, indices: list[int], label_map: dict[int, int], chosen: list[int]) -> Task:
    """A view of ``task.records[indices]`` with only the chosen classes' boxes, labels remapped."""
    records = []
    for i in indices:
        r = task.records[i]
        keep = np.isin(r.labels, list(label_map))
        new_labels = np.array([label_map[int(c)] for c in r.labels[keep]], dtype=np.int64)
        records.append(ImageRecord(r.image_id, r.path, r.width, r.height, r.boxes[keep], new_labels, r.file_name,
                                   r.frame))
    return Task(name=task.name, categories=[task.categories[c] for c in chosen], records=records,
                modality=task.modality, source=task.source, image_loader=task.image_loader)


def _encode(value):
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return {"__int__": str(int(value))}
    return value


def _decode(value):
    if isinstance(value, dict):
        if set(value) == {"__int__"}:
            return int(value["__int__"])
        return {k: _decode(v) for k, v in value.items()}
    return value
