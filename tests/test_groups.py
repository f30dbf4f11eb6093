"""Patients as groups: where groups come from (COCO field, file-name pattern, CSV, DICOM PatientID), that every
split and episode draw keeps a patient in one part, that an image-level split of multi-image patients inflates a
memorising predictor's score and the grouped split removes it, that reused and resumed splits are checked, and
what ``megatron data check`` / ``config validate --data`` report (images per patient, hints, box-size fingerprint).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny_run import KillAt, make_pm, tiny_config

from megatron.data.coco import read_coco_task
from megatron.data.check import check_dataset, k_availability
from megatron.data.episodes import EpisodeSampler
from megatron.data.fingerprint import fingerprint, fingerprint_problems
from megatron.data.folder import read_image_folder
from megatron.data.groups import GROUPING_NONE, grouping_hints
from megatron.data.io import write_image
from megatron.data.preprocess import Preprocessor
from megatron.data.split import split_differences, split_overlaps, split_target
from megatron.data.yolo import read_yolo_task
from test_dicom import make_dicom
from megatron.errors import DataError
from megatron.training.prepare import PreparedData, split_from_record, split_target_three
from megatron.training.runner import run_experiment
from megatron.types import ImageRecord, Task


def patient_task(sizes: list[int], seed: int = 0, empty_share: float = 0.3, name: str = "t") -> Task:
    """A task whose patient ``p`` holds ``sizes[p]`` images; about ``empty_share`` of the patients have no finding."""
    rng = np.random.default_rng(seed)
    records, image_id = [], 1
    for p, size in enumerate(sizes):
        empty = rng.random() < empty_share
        for _ in range(size):
            boxes = np.zeros((0, 4)) if empty else [[4, 4, 20, 20]]
            records.append(ImageRecord(image_id, None, 64, 64, boxes, [] if empty else [0], f"p{p}_{image_id}.png",
                                       group=f"p{p}"))
            image_id += 1
    order = rng.permutation(len(records))  # patients' images interleaved in the file, as in real exports
    return Task(name, ["lesion"], [records[i] for i in order], grouping="test")


def patients_of(task: Task | None) -> set[str]:
    return set() if task is None else {r.group_id for r in task.records}


def test_no_patient_ever_straddles_two_parts_for_any_seed_and_k():
    checked = 0
    for seed in range(50):
        rng = np.random.default_rng(1000 + seed)
        task = patient_task(list(rng.integers(1, 9, size=int(rng.integers(8, 20)))), seed=seed)
        for shots in range(1, len(task)):
            for eval_images in (None, len(task) // 3):
                try:
                    pool, validation, heldout = split_target_three(task, shots, eval_images, None, seed)
                except DataError:
                    continue  # this K does not fit: the split refuses it (with the numbers) rather than leaking
                parts = [patients_of(pool), patients_of(validation), patients_of(heldout)]
                assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
                assert len(pool) == shots  # K stays "annotated images": the last patient may be taken in part
                checked += 1
    assert checked > 2000  # most Ks fit: the property was tested, not skipped


def test_pools_stay_nested_and_held_out_does_not_depend_on_k_with_patients():
    task = patient_task([3, 1, 5, 2, 8, 4, 1, 6, 2, 3, 7, 2, 5, 1, 4, 6, 3, 2, 8, 5], seed=4)
    (p10, h10), (p20, h20) = split_target(task, 10, 30, seed=2), split_target(task, 20, 30, seed=2)
    assert [r.image_id for r in h10.records] == [r.image_id for r in h20.records]
    assert [r.image_id for r in p10.records] == [r.image_id for r in p20.records][:10]


def test_an_ungrouped_task_is_split_exactly_as_before_groups_existed():
    records = [ImageRecord(i + 1, None, 64, 64, np.zeros((0, 4)) if i % 3 == 0 else [[1, 1, 9, 9]],
                           [] if i % 3 == 0 else [0], f"{i}.png") for i in range(60)]
    pool, validation, heldout = split_target_three(Task("t", ["a"], records), 20, None, None, seed=5)
    # what the image-level split drew for this task and seed before groups existed (commit 281a6e3)
    assert [r.image_id for r in pool.records] == [8, 2, 7, 30, 23, 58, 50, 12, 49, 57, 48, 52, 60, 14, 46, 56, 42,
                                                  31, 17, 21]
    assert [r.image_id for r in validation.records] == [11, 13, 15, 34, 53] and len(heldout) == 15


def _memorising_hits(pool: Task, test: Task, features: dict[int, np.ndarray], boxes: dict[int, np.ndarray]) -> float:
    """Share of test images whose box the nearest pool image (by feature) predicts at IoU >= 0.5."""
    pool_ids = [r.image_id for r in pool.records]
    pool_features = np.stack([features[i] for i in pool_ids])
    hits = 0
    for r in test.records:
        nearest = pool_ids[int(np.argmin(((pool_features - features[r.image_id]) ** 2).sum(1)))]
        a, b = boxes[r.image_id], boxes[nearest]
        inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        hits += inter / union >= 0.5
    return hits / len(test)


def test_an_image_level_split_of_near_duplicates_inflates_the_score_and_the_grouped_split_removes_it():
    rng = np.random.default_rng(0)
    records, features, boxes = [], {}, {}
    for p in range(30):  # 30 patients, 4 near-duplicate views each: same lesion, a pixel apart
        centre, look = rng.uniform(12, 52, size=2), rng.normal(size=16)
        for v in range(4):
            i = len(records) + 1
            box = np.array([*(centre - 4 + rng.normal(0, 0.5, 2)), *(centre + 4 + rng.normal(0, 0.5, 2))])
            features[i], boxes[i] = look + rng.normal(0, 0.05, 16), box
            records.append(ImageRecord(i, None, 64, 64, [box], [0], f"p{p}_v{v}.png", group=f"p{p}"))
    grouped = Task("t", ["lesion"], records)
    ungrouped = Task("t", ["lesion"], [ImageRecord(r.image_id, None, 64, 64, r.boxes, r.labels, r.file_name)
                                       for r in records])
    image_level, patient_level = [], []
    for seed in range(10):
        pool, held = split_target(ungrouped, 40, None, seed)
        leaked = {f"p{(r.image_id - 1) // 4}" for r in pool.records} & {f"p{(r.image_id - 1) // 4}" for r in held.records}
        assert leaked  # the image-level split puts a patient's twins on both sides
        image_level.append(_memorising_hits(pool, held, features, boxes))
        pool, held = split_target(grouped, 40, None, seed)
        assert not patients_of(pool) & patients_of(held)
        patient_level.append(_memorising_hits(pool, held, features, boxes))
    # a model that only memorises the pool scores far better when twins leak: the inflation the grouped split removes
    assert np.mean(image_level) > 0.5 and np.mean(patient_level) < 0.1


def test_episodes_draw_support_and_query_from_distinct_patients():
    task = patient_task([4, 3, 5, 2, 6, 3, 4, 2], seed=1, empty_share=0.0)
    by_id = {r.image_id: r.group_id for r in task.records}
    sampler = EpisodeSampler(4, 4, Preprocessor(32), seed=3)
    for _ in range(30):
        draw = sampler._draw(task)
        support = {by_id[task.records[i].image_id] for i in draw.support}
        query = {by_id[task.records[i].image_id] for i in draw.query}
        assert len(draw.support) == 4 and len(draw.query) == 4 and not support & query
    two_way = EpisodeSampler(2, 4, Preprocessor(32), seed=3, n_way=1, k_shot=2)
    for _ in range(30):
        draw = two_way._draw(task)
        assert not {task.records[i].group_id for i in draw.support} & {task.records[i].group_id for i in draw.query}
    with pytest.raises(DataError, match="distinct patients"):
        EpisodeSampler(4, 4, Preprocessor(32), seed=0)._draw(patient_task([8, 2], empty_share=0.0))


# --- where groups come from --------------------------------------------------------------------------------

def coco_folder(root: Path, images: list[dict], size: int = 32) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    for img in images:
        write_image(root / "images" / img["file_name"], np.zeros((size, size), np.uint8))
    anns = [{"id": i + 1, "image_id": img["id"], "category_id": 1, "bbox": [2, 2, 10, 10]} for i, img in enumerate(images)]
    doc = {"images": [{"width": size, "height": size, **img} for img in images], "annotations": anns,
           "categories": [{"id": 1, "name": "lesion"}]}
    (root / "annotations.json").write_text(json.dumps(doc))
    return root / "annotations.json"


def test_coco_patient_id_becomes_the_group_and_a_partly_missing_field_is_an_error_with_the_count(tmp_path):
    ann = coco_folder(tmp_path / "a", [{"id": i, "file_name": f"{i}.png", "patient_id": f"P{i // 2}"} for i in range(6)])
    task, problems = read_coco_task(ann, tmp_path / "a" / "images", name="a")
    assert [r.group for r in task.records] == ["P0", "P0", "P1", "P1", "P2", "P2"]
    assert "patient_id" in task.grouping and not [p for p in problems if p.severity == "error"]
    images = [{"id": i, "file_name": f"{i}.png", **({"patient_id": 7} if i < 2 else {})} for i in range(5)]
    _, problems = read_coco_task(coco_folder(tmp_path / "b", images), tmp_path / "b" / "images", name="b")
    [error] = [p for p in problems if p.code == "group_missing"]
    assert "3 of 5 images have no 'patient_id'" in error.message and "group_field" in error.fix
    custom = [{"id": i, "file_name": f"{i}.png", "subject": f"S{i % 2}"} for i in range(4)]
    task, problems = read_coco_task(coco_folder(tmp_path / "c", custom), tmp_path / "c" / "images", name="c")
    assert task.grouping == GROUPING_NONE and any(p.code == "group_field_unused" and "subject" in p.fix for p in problems)
    task, _ = read_coco_task(tmp_path / "c" / "annotations.json", tmp_path / "c" / "images", name="c",
                             group_field="subject")
    assert {r.group for r in task.records} == {"S0", "S1"}


def yolo_folder(root: Path, names: list[str]) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("lesion\n")
    for n in names:
        write_image(root / "images" / n, np.zeros((32, 32), np.uint8))
        (root / "labels" / Path(n).with_suffix(".txt")).write_text("0 0.5 0.5 0.2 0.2\n")
    return root


def test_group_pattern_and_groups_csv_name_the_patients_and_uncovered_files_are_errors(tmp_path):
    root = yolo_folder(tmp_path / "y", ["pat01_a.png", "pat01_b.png", "pat02_a.png", "other.png"])
    task, problems = read_yolo_task(root, "y", group_pattern=r"^(?P<group>pat\d+)_")
    assert {r.file_name: r.group for r in task.records}["pat01_b.png"] == "pat01"
    [error] = [p for p in problems if p.code == "group_missing"]
    assert "1 of 4" in error.message and "'other.png'" in error.message
    csv = tmp_path / "groups.csv"
    csv.write_text("file_name,patient_id\npat01_a.png,A\npat01_b.png,A\npat02_a.png,B\nother.png,B\n")
    task, problems = read_yolo_task(root, "y", groups_csv=csv)
    assert {r.file_name: r.group for r in task.records} == {"other.png": "B", "pat01_a.png": "A", "pat01_b.png": "A",
                                                             "pat02_a.png": "B"}
    assert not [p for p in problems if p.severity == "error"]
    csv.write_text("file,patient\nx.png,A\n")
    with pytest.raises(DataError, match="file_name,patient_id"):
        read_yolo_task(root, "y", groups_csv=csv)


def test_dicom_patient_id_groups_a_folder_and_study_or_none_can_be_chosen(tmp_path):

    for i in range(4):
        make_dicom(tmp_path / "d" / f"{i}.dcm", np.full((16, 16), i, np.uint16), PatientID=f"PAT{i // 2}",
                   StudyInstanceUID=f"1.2.{i}", PixelSpacing=[0.5, 0.5])
    task, _ = read_image_folder(tmp_path / "d", "d", dicom_only=True)
    assert [r.group for r in task.records] == ["PAT0", "PAT0", "PAT1", "PAT1"]
    assert task.records[0].meta["spacing"] == [0.5, 0.5]
    task, _ = read_image_folder(tmp_path / "d", "d", dicom_only=True, group_by="study")
    assert len({r.group for r in task.records}) == 4
    task, _ = read_image_folder(tmp_path / "d", "d", dicom_only=True, group_by="none")
    assert task.grouping == GROUPING_NONE
    assert any("PatientIDs for 4 images" in h for h in grouping_hints(task))  # present but unused: data check says so


# --- splits on record -----------------------------------------------------------------------------------------

def _run_json(tmp_path: Path, split: dict) -> Path:
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"status": "complete", "learners": {}, "split": split}))
    return path


def test_split_from_refuses_a_split_whose_parts_overlap_naming_the_ids(tmp_path):
    task = patient_task([2, 2, 2, 2, 2, 2], empty_share=0.0)
    ids = [r.image_id for r in task.records]
    entry = {r.image_id: {"id": r.image_id, "file_name": r.file_name} for r in task.records}
    overlapping = {"pool": [entry[ids[0]], entry[ids[1]]], "validation": [],
                   "heldout": [entry[ids[1]], entry[ids[2]]]}
    with pytest.raises(DataError, match=rf"image id\(s\) are in two parts: {ids[1]} \(pool and heldout\)"):
        split_from_record(task, _run_json(tmp_path, overlapping))
    # disjoint ids, but one patient's images on both sides (the data names patients now): refused, naming it
    by_patient = {}
    for r in task.records:
        by_patient.setdefault(r.group, []).append(entry[r.image_id])
    crossing = {"pool": [by_patient["p0"][0]], "validation": [], "heldout": [by_patient["p0"][1], *by_patient["p1"]]}
    with pytest.raises(DataError, match=r"patient\(s\) are in two parts: 'p0' \(pool and heldout\)"):
        split_from_record(task, _run_json(tmp_path, crossing))
    fine = {"pool": by_patient["p0"], "validation": [], "heldout": by_patient["p1"] + by_patient["p2"]}
    pool, validation, heldout = split_from_record(task, _run_json(tmp_path, fine))
    assert patients_of(pool) == {"p0"} and validation is None and patients_of(heldout) == {"p1", "p2"}


def test_the_recorded_split_names_each_images_patient_and_the_grouping(tmp_path):
    task = patient_task([3, 2, 4, 1, 5, 2, 3, 4, 2, 3], seed=2)
    pool, validation, heldout = split_target_three(task, 5, 12, 4, seed=0)
    manifest = PreparedData(task, [], pool, validation, heldout).split_manifest()
    assert manifest["grouping"] == "test"
    assert all(e["group"].startswith("p") for part in ("pool", "validation", "heldout") for e in manifest[part])
    assert manifest["patients"]["pool"] == len(patients_of(pool)) and not split_overlaps(manifest)
    # a record written before groups existed is compared on ids and file names only (resume keeps working) ...
    old = {k: [{"id": e["id"], "file_name": e["file_name"]} for e in manifest[k]] for k in ("pool", "validation", "heldout")}
    assert split_differences(old, manifest) == []
    # ... one with groups also on the patients
    moved = json.loads(json.dumps(manifest))
    moved["heldout"][0]["group"] = "someone-else"
    assert split_differences(moved, manifest) == ["heldout"]


# --- what data check and config validate --data report ---------------------------------------------------------

def test_data_check_reports_images_per_patient_and_hints_at_undeclared_patients(tmp_path):
    images = [{"id": i, "file_name": f"case{i // 3:02d}_view{i % 3}.png"} for i in range(12)]
    coco_folder(tmp_path / "a", images)
    report = check_dataset(tmp_path / "a")
    assert report.patients["groups"] == 12 and report.grouping == GROUPING_NONE
    [hint] = [p for p in report.warnings if p.code == "groups_not_declared"]
    assert "4 file-name prefixes" in hint.message and "group_pattern" in hint.fix
    grouped = [{**img, "patient_id": img["file_name"][:6]} for img in images]
    coco_folder(tmp_path / "b", grouped)
    report = check_dataset(tmp_path / "b")
    assert report.patients == {"groups": 4, "images": 12, "min": 3.0, "median": 3.0, "max": 3.0}
    assert not [p for p in report.warnings if p.code == "groups_not_declared"]


def test_data_check_takes_the_group_source_the_hint_names_and_then_counts_patients(tmp_path, capsys):
    from megatron.cli import main

    images = [{"id": i, "file_name": f"case{i // 3:02d}_view{i % 3}.png"} for i in range(12)]
    coco_folder(tmp_path / "a", images)
    [hint] = [p for p in check_dataset(tmp_path / "a").warnings if p.code == "groups_not_declared"]
    assert "--group-pattern" in hint.fix
    report = check_dataset(tmp_path / "a", group_pattern=r"^(case\d+)_")
    assert report.patients == {"groups": 4, "images": 12, "min": 3.0, "median": 3.0, "max": 3.0}
    assert "group_pattern" in report.grouping and not report.warnings
    # the same from the command line, on a COCO file (most exports carry no patient field) ...
    assert main(["data", "check", str(tmp_path / "a"), "--group-pattern", r"^(case\d+)_", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["patients"]["groups"] == 4
    # ... and from a CSV; a file the CSV leaves out is an error naming it
    (tmp_path / "groups.csv").write_text("file_name,patient_id\n" + "".join(
        f"{img['file_name']},P{img['id'] // 6}\n" for img in images[:-1]))
    report = check_dataset(tmp_path / "a", groups_csv=tmp_path / "groups.csv")
    [missing] = [p for p in report.problems if p.code == "group_missing"]
    assert "1 of 12" in missing.message and "case03_view2.png" in missing.message


def test_a_coco_dataset_groups_patients_by_file_name_through_its_plugin_options(tmp_path):
    from plugins.datasets.coco import CocoDataset

    images = [{"id": i, "file_name": f"pat{i // 4}/slice{i % 4}.png"} for i in range(8)]
    ann = coco_folder(tmp_path / "a", images)
    [task] = CocoDataset(CocoDataset.Options(annotation_file=ann, group_pattern=r"^([^/]+)/")).load()
    assert [r.group for r in task.records] == ["pat0"] * 4 + ["pat1"] * 4
    with pytest.raises(ValueError, match="keep one of them"):
        CocoDataset.Options(annotation_file=ann, group_pattern="x", groups_csv=tmp_path / "g.csv")


def test_data_check_refuses_a_coco_only_group_field_on_a_yolo_folder(tmp_path):
    from dataset_files import make_yolo

    root = make_yolo(tmp_path / "y", {"a": "0 0.5 0.5 0.2 0.2\n"})
    [problem] = [p for p in check_dataset(root, group_field="patient").problems if p.severity == "error"]
    assert "--group-field applies to COCO files" in problem.message and "--group-pattern" in problem.fix


def test_the_fingerprint_measures_boxes_at_the_input_size_and_warns_below_the_stride_with_the_fix():
    records = [ImageRecord(i, None, 512, 512, [[0, 0, 16, 16]] if i % 2 else [[0, 0, 64, 64]], [0], f"{i}.png",
                           meta={"spacing": [0.5, 0.5]}) for i in range(10)]
    task = Task("t", ["lesion"], records)
    small = fingerprint(task, 128, stride=8)  # 16 px boxes of a 512 px image are 4 px at 128
    assert small["boxes_below_stride"] == 5 and small["box_px_at_input"]["q0"] == 4.0
    assert small["box_mm"]["q0"] == 8.0 and small["recommended_input_size"] == 256
    [warning] = fingerprint_problems(small, "t")
    assert "5 of 10 boxes" in warning.message and "data.input_size: 256" in warning.fix
    assert not fingerprint_problems(fingerprint(task, 256, stride=8), "t")
    availability = k_availability(patient_task([2] * 20, empty_share=0.0), 10, None, seed=0)
    assert availability["patients"] == 20 and availability["available_images"] >= 10
    assert availability["evaluation_patients"] + availability["available_patients"] <= 20


def test_resume_refuses_a_recorded_split_whose_parts_overlap_naming_the_ids(tmp_path):
    cfg = tiny_config(tmp_path, **{"training.meta_epochs": 2})
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, run_dir=tmp_path / "r", pm=make_pm(KillAt(2, 1)), progress=False)
    record = json.loads((tmp_path / "r" / "run.json").read_text())
    leaked = record["split"]["pool"][0]
    record["split"]["heldout"].append(leaked)  # a pool image tested on: what a hand-edited record could say
    (tmp_path / "r" / "run.json").write_text(json.dumps(record))
    with pytest.raises(DataError, match=rf"--resume: run.json: the split's parts overlap.*{leaked['id']} \(pool and "
                                        r"heldout\)"):
        run_experiment(cfg, run_dir=tmp_path / "r", pm=make_pm(), resume=True, progress=False)


def test_config_validate_data_prints_the_targets_patients_box_sizes_and_what_k_is_drawn_from(tmp_path, capsys):
    import yaml

    from megatron.cli import main

    target = [{"id": i, "file_name": f"{i}.png", "patient_id": f"P{i // 2}"} for i in range(40)]
    coco_folder(tmp_path / "target", target, size=256)  # 10 px boxes of 256 px images: 5 px at 128
    coco_folder(tmp_path / "source", [{"id": i, "file_name": f"{i}.png"} for i in range(10)])
    config = {"data": {"datasets": [
        {"plugin": "coco", "options": {"annotation_file": str(tmp_path / "target" / "annotations.json"), "name": "tgt"}},
        {"plugin": "coco", "options": {"annotation_file": str(tmp_path / "source" / "annotations.json"), "name": "src"}}],
        "target": "tgt", "shots": 10, "eval_images": 20, "validation_images": 4}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["config", "validate", str(tmp_path / "c.yaml"), "--data"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "patients: 20 for 40 images (images per patient: min 2, median 2, max 2)" in out
    assert "40 of 40 (100%) below the detector's smallest stride (8 px)" in out
    assert "recommended data.input_size: at least 224" in out and "data.input_size: 224" in out
    assert "the evaluation split takes 20 images (10 patients), leaving 20 images of 10 patients" in out
    # a validation split that leaves no held-out patient is refused here, as `run` refuses it (issue 22, item 8)
    config["data"]["validation_images"] = 20
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["config", "validate", str(tmp_path / "c.yaml"), "--data"]) != 0
    assert "data.validation_images" in capsys.readouterr().err


def test_the_dicom_plugin_with_coco_annotations_groups_by_the_files_patient_id(tmp_path):
    from megatron_plugins.datasets.dicom import DicomDataset

    images = []
    for i in range(4):
        make_dicom(tmp_path / "study" / f"{i}.dcm", np.zeros((32, 32), np.uint16), PatientID=f"PAT{i // 2}")
        images.append({"id": i + 1, "file_name": f"{i}.dcm", "width": 32, "height": 32})
    doc = {"images": images, "categories": [{"id": 1, "name": "lesion"}],
           "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [2, 2, 8, 8]} for i in range(1, 5)]}
    (tmp_path / "ann.json").write_text(json.dumps(doc))
    options = {"root": tmp_path / "study", "annotation_file": tmp_path / "ann.json"}
    [task] = DicomDataset(DicomDataset.Options(**options)).load()
    assert [r.group for r in task.records] == ["PAT0", "PAT0", "PAT1", "PAT1"] and "PatientID" in task.grouping
    [task] = DicomDataset(DicomDataset.Options(**options, group_by="none")).load()
    assert task.grouping == GROUPING_NONE
