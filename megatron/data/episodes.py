"""Batches, episodes and the few-shot target split.

- :func:`load_batch` / :func:`iterate_batches`: decoded (cached), preprocessed, collated batches of a task,
  for fine-tuning and evaluation; :func:`plan_batches` draws an epoch's order and per-batch augmentation
  seeds up front, so a :class:`~megatron.data.loader.Loader`'s workers can load the batches in any order.
- :func:`split_target` (in :mod:`megatron.data.split`, imported here): the target task -> (K-image training pool,
  held-out evaluation split), drawn over patients. Nested pools and a K-independent held-out split, so K = 20
  and K = 40 results are comparable (details there).
- :class:`EpisodeSampler`: support/query episodes, image-level K-shot by default or N-way K-shot with an
  explicit label remap; deterministic for a seed, and its RNG state round-trips for exact resume;
  :meth:`EpisodeSampler.meta_batches` streams meta-batches loaded ahead by a loader's workers.
"""
from __future__ import annotations

import itertools
import logging
import weakref
from dataclasses import dataclass
from collections import deque
from typing import Any, Iterator, Sequence

import numpy as np

from megatron.data.groups import has_groups
from megatron.data.loader import Loader
from megatron.data.preprocess import Preprocessor, collate
from megatron.errors import DataError
from megatron.types import Batch, Episode, ImageRecord, Task
from megatron.runtime.distributed import shard as shard_list
# the target split lives in megatron.data.split; imported here for the callers that know it by this module
from megatron.data.split import MIN_EVAL_IMAGES, RESERVED_SHOTS, check_not_empty, split_target  # noqa: F401

log = logging.getLogger(__name__)


def load_batch(task: Task, indices: Sequence[int], pre: Preprocessor, rng: np.random.Generator | None = None) -> Batch:
    """``task.records[i]`` for ``i`` in ``indices``: decoded (through ``pre``'s cache), preprocessed, collated.

    Augmented when ``pre.augment`` and an ``rng`` is given.
    """
    check_not_empty(task, "a batch")
    if len(indices) == 0:
        raise ValueError(f"load_batch on task {task.name!r}: no indices given")
    samples = []
    for i in indices:
        record = task.records[int(i)]
        img = pre.decode(task, record)
        samples.append(pre.transform(img, record.boxes, record.labels, (record.height, record.width), rng,
                                     record.image_id, task.name))
    return collate(samples)


@dataclass(frozen=True)
class BatchJob:
    """One batch to load: ``task``'s record ``indices``, augmented from ``aug_seed`` (``None``: not augmented).
    ``task`` is the task's position in the list the jobs were planned over."""

    task: int
    indices: tuple[int, ...]
    aug_seed: int | None


def plan_batches(n_images: int, batch_size: int, rng: np.random.Generator | None, shuffle: bool,
                 augment: bool, task: int = 0) -> list[BatchJob]:
    """One epoch over ``n_images`` in batches of ``batch_size``: the order (shuffled from ``rng`` when
    ``shuffle``) and, when ``augment`` and an ``rng`` is given, one augmentation seed per batch, drawn from
    ``rng`` now. A batch's pixels then depend on its job alone, whoever loads it."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if shuffle and rng is None:
        raise ValueError("iterate_batches(shuffle=True) needs an rng so the order is reproducible")
    order = rng.permutation(n_images) if shuffle else np.arange(n_images)
    jobs = []
    for start in range(0, n_images, batch_size):
        seed = int(rng.integers(2**63)) if augment and rng is not None else None
        jobs.append(BatchJob(task, tuple(int(i) for i in order[start:start + batch_size]), seed))
    return jobs


def load_planned_batch(context: tuple[Sequence[Task], Preprocessor], job: BatchJob) -> Batch:
    """A :class:`BatchJob` loaded (what a loader's worker runs); ``context``: the tasks and the preprocessor."""
    tasks, pre = context
    rng = np.random.default_rng(job.aug_seed) if job.aug_seed is not None else None
    return load_batch(tasks[job.task], job.indices, pre, rng)


def iterate_batches(task: Task, batch_size: int, pre: Preprocessor, rng: np.random.Generator | None = None,
                    shuffle: bool = False, loader: Loader | None = None) -> Iterator[Batch]:
    """Every image of ``task`` once, in batches of ``batch_size`` (the last one may be smaller).

    ``shuffle`` needs an ``rng`` (the order is drawn from it, so it is reproducible). Batches are augmented
    when ``pre.augment`` and an ``rng`` is given: for evaluation pass ``rng=None`` (or use
    ``pre.without_augment()``, which shares the decoded-image cache). The order and the augmentation seeds
    are drawn from ``rng`` when the first batch is asked for (:func:`plan_batches`); ``loader`` (default: in
    this thread) loads the batches, identically for any number of workers.
    """
    check_not_empty(task, "training or evaluation")
    jobs = plan_batches(len(task), batch_size, rng, shuffle, pre.augment)
    yield from (loader or Loader()).map(load_planned_batch, ([task], pre), jobs)


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
    task's classes; when the task's records name patients (``ImageRecord.group``), support and query come from
    distinct patients (patients in a seeded order, random images within one), so a query image is never a
    near-duplicate of a support image; the N-way query likewise leaves out the support's patients. N-way K-shot (``n_way`` set): draw ``n_way`` of the task's classes (among those with
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
        picks, draws, keep = self._draw_meta_batch(tasks, size, shard)
        return [self._load(tasks[picks[j]], draws[j]) for j in keep]

    def meta_batches(self, tasks: list[Task], size: int, steps: int | None, shard: Any | None = None,
                     loader: Loader | None = None) -> Iterator["MetaBatch"]:
        """``steps`` meta-batches (``None``: as many as are asked for), each exactly what :meth:`meta_batch` would return at that point (with
        ``last_drawn_ids`` set as it sets it), loaded ahead by ``loader``'s workers (default: in this thread).

        The meta-batches are drawn in this thread, in order, at most the loader's prefetch ahead of the one
        consumed; closing the iterator (or stopping early: a budget) puts the sampler back to the state after
        the last meta-batch consumed, so ``state_dict()`` and resume see only what training used.
        """
        per_rank = len(shard_list(list(range(size)), shard)) if shard is not None else size
        ahead: deque = deque()  # (sampler state before the draw, drawn ids) of each drawn, unconsumed meta-batch

        def plan() -> Iterator[tuple[int, _Draw]]:
            for _ in (range(steps) if steps is not None else itertools.count()):
                before = self.state_dict()
                picks, draws, keep = self._draw_meta_batch(tasks, size, shard)
                ahead.append((before, self.last_drawn_ids))
                yield from ((picks[j], draws[j]) for j in keep)

        items = (loader or Loader()).map(_load_drawn_episode, (self, tasks), plan())
        try:
            for _ in (range(steps) if steps is not None else itertools.count()):
                episodes = [next(items) for _ in range(per_rank)]
                _, ids = ahead.popleft()
                self.last_drawn_ids = ids
                yield MetaBatch(episodes, ids)
        finally:
            items.close()
            if ahead:  # drawn ahead for the workers, never used: as if never drawn
                self.load_state_dict(ahead[0][0])
                self.last_drawn_ids = []

    def _draw_meta_batch(self, tasks: list[Task], size: int, shard: Any | None
                         ) -> tuple[list[int], list["_Draw"], Sequence[int]]:
        """Draw a whole meta-batch (task picks and episode draws, nothing decoded): the picks, the draws and the
        positions this rank loads; sets ``last_drawn_ids``."""
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
        keep: Sequence[int] = range(size)
        if shard is not None:
            keep = shard_list(list(range(size)), shard)
        return picks, draws, keep

    def _draw(self, task: Task) -> "_Draw":
        """The random part of an episode (its images, N-way classes, augmentation seed); nothing decoded."""
        check_not_empty(task, "episodes")
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
        if has_groups(task):
            return self._image_level_by_patient(task)
        drawn = [int(i) for i in self.rng.choice(len(task), need, replace=False)]
        return drawn[: self.support_size], drawn[self.support_size:]

    def _image_level_by_patient(self, task: Task) -> tuple[list[int], list[int]]:
        """Support then query images from patients in a seeded order (random images within a patient), so no
        patient is in both: the query is not a near-duplicate of a support image."""
        members: dict[str, list[int]] = {}
        for i, record in enumerate(task.records):
            members.setdefault(record.group_id, []).append(i)
        groups = list(members.values())
        largest = max(len(m) for m in groups)
        if len(task) - (self.support_size + largest - 1) < self.query_size:
            raise DataError(
                f"task {task.name!r} has {len(task)} images of {len(groups)} patients (the largest holds {largest}): "
                f"support {self.support_size} + query {self.query_size} images from distinct patients cannot always "
                "be drawn; lower episodes.support_size / episodes.query_size or add patients to the task")
        support: list[int] = []
        query: list[int] = []
        for g in self.rng.permutation(len(groups)):
            part, need = (support, self.support_size) if len(support) < self.support_size else (query, self.query_size)
            part.extend(int(i) for i in self.rng.permutation(groups[int(g)])[: need - len(part)])
            if len(query) == self.query_size:
                break
        return support, query

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
        support_patients = {task.records[i].group_id for i in support}  # no patient in support and query
        rest = [int(i) for i in holding if int(i) not in in_support
                and task.records[int(i)].group_id not in support_patients]
        if not rest:
            raise DataError(
                f"task {task.name!r}: after the {len(support)} support images (and their patients' other images) no "
                f"image with the chosen classes ({', '.join(task.categories[c] for c in chosen)}) is left for the "
                "query; lower episodes.k_shot or annotate more images (of more patients)"
            )
        query = [int(i) for i in self.rng.permutation(rest)[: self.query_size]]
        return support, query, chosen


@dataclass(frozen=True)
class MetaBatch:
    """One meta-batch of :meth:`EpisodeSampler.meta_batches`: this rank's episodes, and ``(task name, image
    id)`` of every image the whole meta-batch drew (all ranks'), in order."""

    episodes: list[Episode]
    drawn_ids: list[tuple[str, int]]


def _load_drawn_episode(context: tuple["EpisodeSampler", list[Task]], job: tuple[int, "_Draw"]) -> Episode:
    """A drawn episode loaded (what a loader's worker runs): ``job`` is (task position, draw)."""
    sampler, tasks = context
    return sampler._load(tasks[job[0]], job[1])


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
        # group and meta travel along: a loader may need them (a volume slice is found through its meta)
        records.append(ImageRecord(r.image_id, r.path, r.width, r.height, r.boxes[keep], new_labels, r.file_name,
                                   r.frame, group=r.group, meta=r.meta))
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
