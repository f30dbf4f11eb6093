"""The few-shot target split, drawn over patients: pool (K images), validation and held-out test split.

The patient is the unit of independence (DESIGN.md, "Medical images"): a patient's images are all in one part,
for every seed and K, so no model is trained or selected on a patient it is then tested on. A record's patient is
its :attr:`~megatron.types.ImageRecord.group_id`; without groups every image is its own patient and the split
is exactly the image-level split megatron drew before groups existed (same seed, same images).

How the parts are filled from patients (:func:`split_target`, :func:`carve_validation`):

- **Held-out (and validation): whole patients, to the nearest patient.** Patients are taken in a seeded order
  (stratified: patients with findings / without, in the task's image proportions) while taking the next one
  brings the image count closer to the wanted size, so a part holds its requested number of images give or
  take half a patient (exactly, without groups). Without ``data.eval_images`` the held-out split is "every
  patient outside the reserved pool" and stops *before* the patient that would reach into the reserve, so every
  K that fits the images fits the patients. Stopping at the first patient that does not fit, rather than
  skipping to a smaller one, keeps the choice unbiased by patient size.
- **Pool: exactly K images.** The remaining patients are put in one seeded order (findings first,
  no-finding patients interleaved in proportion) and their images fill the pool in that order until it holds
  K; the last patient may be taken **in part** (its images with findings first, then in file order), and its
  other images are in no part at all, so K stays "annotated images" and no patient straddles two parts. The
  pools stay nested (for one seed the K = 20 pool is a prefix of the K = 40 pool).
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from megatron.errors import DataError
from megatron.types import Task

log = logging.getLogger(__name__)

#: the smallest held-out split :func:`split_target` accepts when it chooses the split size itself
MIN_EVAL_IMAGES = 5
#: the largest K whose pool is reserved out of the evaluation split by default (the method compares K=20, 40)
RESERVED_SHOTS = 40
#: the parts of a recorded split (``run.json["split"]``)
SPLIT_PARTS = ("pool", "validation", "heldout")


def check_not_empty(task: Task, what: str) -> None:
    """A DataError naming the task and the fix when it has no images."""
    if len(task) == 0:
        raise DataError(
            f"task {task.name!r} ({task.source or 'no source'}) has no images, so it cannot be used for {what}; "
            "check the dataset path/annotation file, or remove the task from data.datasets / data.sources"
        )


class _Patients:
    """A task's records grouped by patient, in the order each patient first appears."""

    def __init__(self, task: Task):
        index: dict[str, int] = {}
        self.members: list[list[int]] = []
        for i, record in enumerate(task.records):
            g = index.setdefault(record.group_id, len(index))
            if g == len(self.members):
                self.members.append([])
            self.members[g].append(i)
        self.sizes = np.array([len(m) for m in self.members], dtype=np.int64)
        has_finding = [any(len(task.records[i].boxes) for i in m) for m in self.members]
        self.with_findings = np.flatnonzero(has_finding)
        self.without = np.flatnonzero(~np.array(has_finding, dtype=bool))
        # within a patient: images with findings first, then the rest, each in file order
        self.ordered = [sorted(m, key=lambda i: not len(task.records[i].boxes)) for m in self.members]

    def images(self, groups) -> int:
        return int(self.sizes[list(groups)].sum()) if len(groups) else 0


def _take_nearest(order, sizes: np.ndarray, quota: int, overshoot: bool = True) -> list[int]:
    """Patients from ``order`` while the next one brings the image count closer to ``quota`` (module docstring);
    ``overshoot=False``: while the count stays within ``quota``."""
    taken, count = [], 0
    for g in order:
        size = int(sizes[g])
        over = count + size - quota
        if over > 0 and (not overshoot or over >= quota - count):  # stop: past the quota, or not nearer to it
            break
        taken.append(int(g))
        count += size
    return taken


def _stratified_patients(rng: np.random.Generator, patients: _Patients, strata: list[np.ndarray],
                         count: int, overshoot: bool) -> list[int]:
    """Patients spread over ``strata`` so each holds about its share (by images, largest remainder) of ``count``
    images; random within a stratum."""
    images = [patients.images(s) for s in strata]
    total = sum(images)
    exact = [count * n / total for n in images]
    take = [int(e) for e in exact]
    for j in sorted(range(len(strata)), key=lambda j: exact[j] - take[j], reverse=True)[: count - sum(take)]:
        take[j] += 1
    picked: list[int] = []
    for s, k in zip(strata, take):
        picked.extend(_take_nearest(rng.permutation(s), patients.sizes, k, overshoot))
    return picked


def _either(fixes: list[str]) -> str:
    """``["a", "b", "c"]`` -> ``"a, b, or c"``: the possible fixes of a split that does not fit."""
    return fixes[0] if len(fixes) == 1 else ", ".join(fixes[:-1]) + ", or " + fixes[-1]


def _check_arguments(task: Task, shots: int, eval_images: int | None) -> None:
    check_not_empty(task, "a few-shot target")
    if shots < 1:
        raise DataError(f"target task {task.name!r}: shots (K) must be >= 1, got {shots}; set data.shots")
    if eval_images is not None and eval_images < 1:
        raise DataError(f"target task {task.name!r}: eval_images must be >= 1, got {eval_images}; set data.eval_images")
    ids = [r.image_id for r in task.records]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})[:10]
        raise DataError(f"target task {task.name!r}: image ids repeat ({dupes}); the split needs unique image ids, "
                        "fix the annotation file")


def eval_size(task: Task, shots: int, eval_images: int | None, *, reserve: int = RESERVED_SHOTS,
              min_eval_images: int = MIN_EVAL_IMAGES) -> int:
    """How many images the evaluation split (validation + held-out) asks for; a DataError with the numbers and
    the fix when K and it do not fit in the task."""
    n = len(task)
    if eval_images is not None:
        if shots + eval_images > n:
            fixes = []
            if n - eval_images >= 1:
                fixes.append(f"lower data.shots to at most {n - eval_images}")
            if n - shots >= 1:
                fixes.append(f"lower data.eval_images to at most {n - shots}")
            fixes.append(f"add at least {shots + eval_images - n} image(s) to the target")
            raise DataError(
                f"target task {task.name!r} has {n} images: a pool of K={shots} plus {eval_images} held-out images "
                f"(data.shots + data.eval_images) needs {shots + eval_images}; fix: {_either(fixes)}"
            )
        return eval_images
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
    return n - min(max(shots, reserve), n - min_eval_images)


def split_target(task: Task, shots: int, eval_images: int | None, seed: int, *,
                 reserve: int = RESERVED_SHOTS, min_eval_images: int = MIN_EVAL_IMAGES) -> tuple[Task, Task]:
    """Split the few-shot target into ``(pool, held_out)``: a ``shots``-image training pool and an evaluation
    split no training step may see, with no patient in both. Deterministic for ``seed``.

    How, and why (patients: see the module docstring):

    1. **Held-out first, independent of K.** Its size is ``eval_images`` when given, otherwise every image
       outside the first ``max(shots, reserve)`` (``reserve`` = 40, the method's largest K) — capped so at
       least ``min_eval_images`` remain. It is drawn stratified (patients with findings / without, in the
       task's proportions) from a seeded generator, so for one seed it is *the same patients for every
       K <= reserve*: K = 20 and K = 40 numbers are measured on identical evaluation data.
    2. **Nested pools.** The remaining patients are put in one seeded order and the pool is its first K
       images, so the K = 20 pool is a subset of the K = 40 pool (same seed): a K comparison changes only how
       much data there is, not which. With ``eval_images=None`` and K = 20, the 20 images reserved for K = 40
       are in neither split.
    3. **Findings first, empties proportionally.** The order interleaves the two strata so that every
       prefix of k images holds about ``floor(k * f)`` no-finding images (f: the task's no-finding fraction):
       the pool keeps negatives in proportion, rounded down in favour of annotated images (a few-shot
       pool should not waste its K on empty images by chance).

    Both returned tasks keep the task's name, categories, loader and grouping (so they share decoded-image cache
    entries); the held-out records stay in the task's order. Errors: :class:`DataError` with the numbers and
    the fix when K does not fit.
    """
    _check_arguments(task, shots, eval_images)
    n_eval = eval_size(task, shots, eval_images, reserve=reserve, min_eval_images=min_eval_images)
    patients = _Patients(task)
    rng = np.random.default_rng(seed)
    # data.eval_images given: its size to the nearest patient; not given: every patient outside the reserved pool,
    # never reaching into it (so any K that fits the images fits the patients)
    held_groups = _stratified_patients(rng, patients, [patients.with_findings, patients.without], n_eval,
                                       overshoot=eval_images is not None)
    if not held_groups:
        raise DataError(f"target task {task.name!r}: a held-out split of about {n_eval} images cannot be made of "
                        f"whole patients (the patients drawn first hold {int(patients.sizes.max())} images or more); "
                        "fix: raise data.eval_images, or add patients to the target")
    held = sorted(i for g in held_groups for i in patients.members[g])
    order = _pool_order(rng, patients, set(held_groups), len(task))
    pool = _fill_pool(task, patients, order, shots, len(held))
    held_out = task.subset(held)
    log.info("target %r: pool of %d images from %d patients (%d without findings), %d held out from %d patients, "
             "seed %d", task.name, len(pool), len({r.group_id for r in pool.records}),
             sum(len(r.boxes) == 0 for r in pool.records), len(held_out), len(held_groups), seed)
    return pool, held_out


def _pool_order(rng: np.random.Generator, patients: _Patients, held: set[int], n_images: int) -> list[int]:
    """The patients outside the held-out split in pool order: findings first, no-finding patients interleaved so
    every prefix holds its proportion of no-finding images (rounded down)."""
    rest_f = [int(g) for g in rng.permutation(patients.with_findings) if int(g) not in held]
    rest_e = [int(g) for g in rng.permutation(patients.without) if int(g) not in held]
    empty_fraction = patients.images(patients.without) / n_images
    order: list[int] = []
    n_taken = n_empty = fi = ei = 0
    while fi < len(rest_f) or ei < len(rest_e):
        want_empty = n_empty < int((n_taken + 1) * empty_fraction + 1e-9)
        if (want_empty and ei < len(rest_e)) or fi >= len(rest_f):
            g, ei = rest_e[ei], ei + 1
            n_empty += int(patients.sizes[g])
        else:
            g, fi = rest_f[fi], fi + 1
        order.append(g)
        n_taken += int(patients.sizes[g])
    return order


def _fill_pool(task: Task, patients: _Patients, order: list[int], shots: int, n_held: int) -> Task:
    """The first ``shots`` images of the patients in ``order`` (the last patient possibly in part)."""
    images = [i for g in order for i in patients.ordered[g]]
    if len(images) < shots:
        raise DataError(
            f"target task {task.name!r}: the held-out split took whole patients ({n_held} images), leaving "
            f"{len(images)} images of {len(order)} patients for the pool, fewer than K={shots}; fix: lower data.shots "
            f"to at most {len(images)}, set data.eval_images lower, or add patients to the target")
    return task.subset(images[:shots])


def carve_validation(held: Task, n_val: int, seed: int) -> tuple[Task, Task]:
    """``(validation, heldout)``: about ``n_val`` images of whole patients of ``held`` (stratified by findings,
    seeded, to the nearest patient) set apart; both non-empty, else a DataError with the fix."""
    patients = _Patients(held)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x7A11D])
    n_images_with = patients.images(patients.with_findings)
    n_images_without = len(held) - n_images_with
    n_with = min(n_images_with, max(n_val - n_images_without, round(n_val * n_images_with / len(held))))
    chosen = _take_nearest(rng.permutation(patients.with_findings), patients.sizes, n_with)
    chosen += _take_nearest(rng.permutation(patients.without), patients.sizes, n_val - n_with)
    picked = {i for g in chosen for i in patients.members[g]}
    if not picked or len(picked) == len(held):
        what = "no patient fits in it" if not picked else "it would take every evaluation patient"
        raise DataError(
            f"target task {held.name!r}: a validation split of about {n_val} images cannot be carved from the "
            f"{len(held)} evaluation images ({len(patients.members)} patients) by whole patients: {what}; fix: "
            "change data.validation_images, raise data.eval_images, or set data.validation_images: 0 (the final "
            "model is then reported, without selection)")
    validation = held.subset(sorted(picked))
    heldout = held.subset([i for i in range(len(held)) if i not in picked])
    log.info("target %r: validation split of %d images (%d patients), %d held out", held.name, len(validation),
             len(chosen), len(heldout))
    return validation, heldout


# -- a split on record ----------------------------------------------------------------------------------------

def _entry_group(entry: dict) -> str:
    return str(entry["group"]) if entry.get("group") is not None else f"image:{entry.get('id')}"


def split_overlaps(manifest: dict[str, Any]) -> list[str]:
    """What a recorded split holds in two parts at once: image ids, and groups (patients) where recorded; one
    sentence per kind, naming them. Empty when the parts are disjoint."""
    owners: dict[Any, list[str]] = {}
    group_owners: dict[str, set[str]] = {}
    for part in SPLIT_PARTS:
        for entry in manifest.get(part) or []:
            if not isinstance(entry, dict):
                continue
            owners.setdefault(entry.get("id"), []).append(part)
            group_owners.setdefault(_entry_group(entry), set()).add(part)
    problems = []
    ids = [(i, parts) for i, parts in owners.items() if len(parts) > 1]
    if ids:
        shown = ", ".join(f"{i} ({' and '.join(parts)})" for i, parts in ids[:10]) + (" ..." if len(ids) > 10 else "")
        problems.append(f"{len(ids)} image id(s) are in two parts: {shown}")
    groups = [(g, parts) for g, parts in group_owners.items() if len(parts) > 1 and not g.startswith("image:")]
    if groups:
        shown = ", ".join(f"{g!r} ({' and '.join(sorted(parts, key=SPLIT_PARTS.index))})" for g, parts in groups[:10])
        problems.append(f"{len(groups)} patient(s) are in two parts: {shown}{' ...' if len(groups) > 10 else ''}")
    return problems


def refuse_overlaps(manifest: dict[str, Any], where: str,
                    fix: str = "drop --split-from to draw a new split, or repair the run record") -> None:
    """A DataError naming the ids (and patients) a recorded split holds in two parts; nothing when disjoint."""
    overlaps = split_overlaps(manifest)
    if overlaps:
        raise DataError(f"{where}: the split's parts overlap, so the model would be tested on what it was trained or "
                        f"selected on: {'; '.join(overlaps)}; fix: {fix}")


def split_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """How a recorded split differs from a freshly drawn one, part by part (ids, file names, and groups where the
    old record has them: a record written before groups existed is compared on ids and file names)."""
    diffs = []
    for part in SPLIT_PARTS:
        before, now = old.get(part) or [], new.get(part) or []
        key = ["id", "file_name"]
        if any(isinstance(e, dict) and "group" in e for e in before):
            key.append("group")
        if [[e.get(k) for k in key] for e in before] != [[e.get(k) for k in key] for e in now]:
            diffs.append(part)
    return diffs
