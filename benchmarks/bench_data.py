"""Does the data path keep up with the model? Loader rates per worker, their scaling, memory, and the model step.

Measures, for three kinds of input:

- ``png``: the built-in ``medsynth`` suite's PNGs when its plugin is installed (else synthetic 512-px 16-bit
  PNGs with lesion-like blobs; ``--source`` chooses);
- ``dicom``: 512x512 16-bit (12 bits stored) MONOCHROME2 DICOM files with a VOI window, written by this script
  with pydicom and read the way every megatron dataset reads DICOM (``DicomImageLoader``: decode, modality LUT,
  windowing);
- ``nifti``: axial slices of 512x512 int16 CT-like NIfTI volumes (gzip) with label maps, written with nibabel
  and read through ``megatron.data.volumes`` (``read_volume_task``: canonical orientation, a CT window, an LRU
  of decoded volumes per process).

1. **loader**: images per second of meta-training episodes (support 4 + query 4 images, augmented,
   letterboxed to 256 px, collated; meta-batches of 2 through ``EpisodeSampler.meta_batches``) with the
   decoding in the training process (0 workers) and with 1, 2, 4 workers, both kinds (megatron's: threads sharing
   the decoded-image cache; the alternative: DataLoader worker processes, :class:`ProcessLoader`), cold (decoded-image cache off: every
   image read and decoded) and warm (every image decoded into the cache beforehand, as from the second epoch
   on). Per worker: the rate divided by the workers; scaling: the rate over the 1-worker rate.
2. **memory**: peak memory (resident set of the process plus the proportional set of its worker processes,
   sampled every 20 ms) above the start, over two warm passes of the DICOM images with the cache on, with 0 and
   4 workers.
3. **model** (skipped with ``--no-model``): YOLOX-tiny train steps per second (forward + backward + SGD) at
   256 px on a batch of 8, built with mmdet directly; ``ratio = data images/s ÷ (8 × steps/s)`` is how many
   times faster the data path is than the model consuming it.

Every worker runs one OpenCV and one torch thread (``--threads``, default 1, is the training process's), so the
rates add up per core. On a machine shared with other jobs the rates move with its load (``load_average_1min``
is recorded); compare scaling, not absolute rates, between runs.

    python benchmarks/bench_data.py [--quick] [--source auto|medsynth|synthetic] [--formats png,dicom,nifti]
                                    [--workers 1,2,4] [--kinds thread,process] [--device cpu|cuda] [--no-model]

Prints tables and writes benchmarks/out/bench_data.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from megatron.data.episodes import EpisodeSampler
from megatron.data.io import DicomImageLoader, read_image
from megatron.data.loader import Loader
from megatron.data.preprocess import Preprocessor
from megatron.types import ImageRecord, Task
from peak_memory import PeakMemory  # same folder

OUT = Path(__file__).resolve().parent / "out"
INPUT_SIZE = 256
SUPPORT = QUERY = 4
META_BATCH = 2
#: the medical inputs' size (the issue's 512-px 16-bit DICOM)
MEDICAL_SIZE = 512
MEMORY_SAMPLE_S = 0.02


# --- inputs -------------------------------------------------------------------------------------------
def blob_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list, list]:
    """12-bit values on a blurred-noise background with 1-3 bright blobs (1 image in 8 has none)."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    img = 1200 + 300 * cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), 6)
    boxes, labels = [], []
    for _ in range(int(rng.integers(0, 4))):
        r = float(rng.uniform(8, 40))
        cx, cy = rng.uniform(r, size - r, 2)
        img += 1500 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (r / 2) ** 2))
        boxes.append([cx - r, cy - r, cx + r, cy + r])
        labels.append(int(rng.integers(0, 2)))
    return np.clip(img, 0, 4095).astype(np.uint16), boxes, labels


def synthetic_task(folder: Path, n_images: int, size: int = MEDICAL_SIZE, seed: int = 0) -> Task:
    """16-bit PNGs (12-bit values) with lesion-like blobs."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n_images):
        img, boxes, labels = blob_image(rng, size)
        path = folder / f"img{i:04d}.png"
        cv2.imwrite(str(path), img)
        records.append(ImageRecord(i, path, size, size, np.array(boxes).reshape(-1, 4), np.array(labels, np.int64),
                                   path.name))
    return Task("synthetic", ["mass", "calcification"], records, modality="synthetic", source=str(folder),
                image_loader=lambda r: read_image(r.path))


def dicom_task(folder: Path, n_images: int, size: int = MEDICAL_SIZE, seed: int = 1) -> Task:
    """512-px 16-bit MONOCHROME2 DICOM files (12 bits stored, a window centre/width), one blob image each."""
    from pydicom.dataset import Dataset, FileMetaDataset  # optional dependency: the DICOM input only
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    rng = np.random.default_rng(seed)
    records = []
    for i in range(n_images):
        img, boxes, labels = blob_image(rng, size)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.Modality = SecondaryCaptureImageStorage, "OT"
        ds.set_pixel_data(img, photometric_interpretation="MONOCHROME2", bits_stored=12)
        ds.WindowCenter, ds.WindowWidth = 2000, 3000
        path = folder / f"img{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        records.append(ImageRecord(i, path, size, size, np.array(boxes).reshape(-1, 4), np.array(labels, np.int64),
                                   path.name))
    return Task("dicom", ["mass", "calcification"], records, modality="synthetic", source=str(folder),
                image_loader=DicomImageLoader())


def nifti_task(folder: Path, n_volumes: int, slices: int, size: int = MEDICAL_SIZE, seed: int = 2) -> Task:
    """CT-like int16 NIfTI volumes (``size`` x ``size`` x ``slices``, gzip) with a spherical lesion each and its
    label map; every slice becomes an image (``megatron.data.volumes``)."""
    import nibabel as nib  # optional dependency: the NIfTI input only

    from megatron.data.volumes import Intensity, SliceSettings, VolumeAnnotations, read_volume_task

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    ii, jj = np.mgrid[:size, :size].astype(np.float32)
    for v in range(n_volumes):
        body = -1000 + 1040 * (((ii - size / 2) ** 2 + (jj - size / 2) ** 2) < (0.45 * size) ** 2)
        vol = np.repeat(body[:, :, None], slices, axis=2) + rng.normal(0, 20, (size, size, slices))
        ci, cj = rng.uniform(0.3 * size, 0.7 * size, 2)
        ck, r = slices / 2, float(rng.uniform(6, 20))
        kk = np.arange(slices)[None, None, :]
        lesion = ((ii[:, :, None] - ci) ** 2 + (jj[:, :, None] - cj) ** 2 + ((kk - ck) * 3.5) ** 2) < r ** 2
        vol[lesion] += 60
        nib.save(nib.Nifti1Image(vol.astype(np.int16), affine), folder / "images" / f"case{v}.nii.gz")
        nib.save(nib.Nifti1Image(lesion.astype(np.uint8), affine), folder / "labels" / f"case{v}.nii.gz")
    settings = SliceSettings(axis="axial", intensity=Intensity.from_option("soft_tissue"), empty_fraction=1.0)
    task, _ = read_volume_task(folder / "images", "nifti", VolumeAnnotations(label_dir=folder / "labels"), settings)
    return task


def medsynth_tasks(cache_dir: Path) -> list[Task] | None:
    """The built-in suite's tasks (read from its on-disk COCO cache), or None when the plugin is not available."""
    try:
        from megatron import get_plugin_manager

        pm = get_plugin_manager(autoload=False)
        cls = pm.registers["dataset"].get("medsynth")
    except Exception:  # noqa: BLE001 - plugin not installed: fall back to synthetic PNGs
        return None
    options = {"cache_dir": str(cache_dir)} if "cache_dir" in cls.Options.model_fields else {}
    return cls(cls.Options(**options)).load()


def fresh(tasks: list[Task]) -> list[Task]:
    """The tasks with a fresh copy of their image loader: a volume loader's decoded volumes are dropped (cold)."""
    out = []
    for t in tasks:
        try:
            loader = pickle.loads(pickle.dumps(t.image_loader))
        except (pickle.PicklingError, AttributeError, TypeError):  # a closure holds no state to drop
            loader = t.image_loader
        out.append(dataclasses.replace(t, image_loader=loader))
    return out


# --- measuring ------------------------------------------------------------------------------------------
def _identity(item):
    return item


class _JobDataset(torch.utils.data.Dataset):
    """``dataset[job] = fn(context, job)``: a stream of jobs as a DataLoader sees it."""

    def __init__(self, fn, context):
        self.fn, self.context = fn, context

    def __getitem__(self, job):
        return self.fn(self.context, job)


def _start_worker_process(worker_id: int) -> None:
    cv2.setNumThreads(1)  # the DataLoader sets torch's threads to 1 in its workers


@dataclasses.dataclass(frozen=True)
class ProcessLoader:
    """The alternative megatron did not keep (measured here, see megatron/data/loader.py): ``Loader.map`` with
    ``torch.utils.data.DataLoader`` worker processes, forked for each stream (they inherit the tasks and the
    training process's cache; what they decode stays in their own copy). Not safe once pyarrow's jemalloc
    thread runs (a forked worker can hang): this script never imports pandas."""

    workers: int
    prefetch: int = 2

    def map(self, fn, context, jobs):
        loader = torch.utils.data.DataLoader(
            _JobDataset(fn, context), batch_size=None, sampler=jobs, num_workers=self.workers,
            prefetch_factor=self.prefetch, collate_fn=_identity, worker_init_fn=_start_worker_process,
            multiprocessing_context="fork", generator=torch.Generator())
        yield from loader


def make_loader(kind: str, workers: int, prefetch: int):
    """Threads (megatron's loader) or worker processes; ``in-process``: 0 workers."""
    return ProcessLoader(workers, prefetch) if kind == "process" else Loader(workers, prefetch)


def loader_rate(tasks: list[Task], loader, warm: bool, meta_batches: int, augment: bool) -> float:
    """Images per second of ``meta_batches`` meta-batches of episodes through ``loader``."""
    tasks = fresh(tasks)
    pre = Preprocessor(INPUT_SIZE, augment=augment, cache_bytes=(1 << 30) if warm else 0)
    if warm:  # one pass decodes every image into the cache
        for t in tasks:
            for r in t.records:
                pre.decode(t, r)
    sampler = EpisodeSampler(SUPPORT, QUERY, pre, seed=0)
    start = time.perf_counter()
    images = 0
    for meta in sampler.meta_batches(tasks, META_BATCH, meta_batches, loader=loader):
        images += sum(len(e.support) + len(e.query) for e in meta.episodes)
    return images / (time.perf_counter() - start)


def loader_table(name: str, tasks: list[Task], args, meta_batches: int) -> list[dict]:
    """Rates with 0 workers and with each worker count and kind, cold and warm."""
    rows = []
    setups = [("in-process", 0)] + [(kind, w) for kind in args.kinds for w in args.workers]
    for kind, workers in setups:
        row = {"input": name, "kind": kind, "workers": workers}
        for state in ("cold", "warm"):
            loader = make_loader(kind, workers, args.prefetch)
            row[f"{state}_images_per_s"] = loader_rate(tasks, loader, state == "warm", meta_batches, args.augment)
        rows.append(row)
    for row in rows:
        one = next((r for r in rows if r["kind"] == row["kind"] and r["workers"] == 1), None)
        for state in ("cold", "warm"):
            rate = row[f"{state}_images_per_s"]
            row[f"{state}_per_worker"] = rate / max(1, row["workers"])
            row[f"{state}_scaling"] = rate / one[f"{state}_images_per_s"] if one else None
    return rows


def memory_probe(folder: Path, kind: str, workers: int, prefetch: int, augment: bool) -> dict:
    """Run in a fresh process (``--memory-probe``): two warm passes (cache on) over the DICOM files in ``folder``
    with the given workers; peak memory (this process + its workers) above the start, and at the start."""
    paths = sorted(folder.glob("*.dcm"))
    records = [ImageRecord(i, p, MEDICAL_SIZE, MEDICAL_SIZE, np.zeros((0, 4)), np.zeros(0, np.int64), p.name)
               for i, p in enumerate(paths)]
    task = Task("dicom", ["mass"], records, image_loader=DicomImageLoader())
    pre = Preprocessor(INPUT_SIZE, augment=augment)
    sampler = EpisodeSampler(SUPPORT, QUERY, pre, seed=0)
    meta_batches = max(1, 2 * len(records) // (META_BATCH * (SUPPORT + QUERY)))
    loader = make_loader(kind, workers, prefetch)
    with PeakMemory(MEMORY_SAMPLE_S) as mem:
        for _ in sampler.meta_batches([task], META_BATCH, meta_batches, loader=loader):
            pass
    return {"kind": kind, "workers": workers, "peak_mib": mem.peak / 2**20, "start_mib": mem.base / 2**20,
            "cache_mib_in_training_process": pre.cache.nbytes / 2**20, "images": len(records)}


def memory_rows(folder: Path, args) -> list[dict]:
    """:func:`memory_probe` with 0 workers and 4 of each kind, each in a fresh Python process (so one
    measurement's heap does not hide the next one's growth)."""
    rows = []
    for kind, workers in [("in-process", 0)] + [(kind, 4) for kind in args.kinds]:
        cmd = [sys.executable, __file__, "--memory-probe", str(folder), kind, str(workers), "--prefetch",
               str(args.prefetch), "--augment" if args.augment else "--no-augment"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def time_model_steps(n: int, device: str, batch_size: int = SUPPORT + QUERY) -> tuple[float, dict]:
    """YOLOX-tiny (mmdet, 2 classes) train steps per second at 256 px, batch ``batch_size``."""
    import mmdet  # optional dependency: the model side only
    from mmdet.registry import MODELS
    from mmdet.structures import DetDataSample
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.structures import InstanceData

    cfg = Config.fromfile(str(Path(mmdet.__file__).parent / ".mim/configs/yolox/yolox_tiny_8xb8-300e_coco.py"))
    cfg.model.bbox_head.num_classes = 2
    init_default_scope("mmdet")
    model = MODELS.build(cfg.model).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.rand(batch_size, 3, INPUT_SIZE, INPUT_SIZE, generator=gen) * 255).to(device)
    samples = []
    for _ in range(batch_size):
        s = DetDataSample(metainfo=dict(img_shape=(INPUT_SIZE, INPUT_SIZE), pad_shape=(INPUT_SIZE, INPUT_SIZE),
                                        batch_input_shape=(INPUT_SIZE, INPUT_SIZE)))
        xy = torch.rand(3, 2, generator=gen) * (INPUT_SIZE - 60)
        wh = 10 + torch.rand(3, 2, generator=gen) * 50
        s.gt_instances = InstanceData(bboxes=torch.cat([xy, xy + wh], 1).to(device),
                                      labels=torch.randint(0, 2, (3,), generator=gen).to(device))
        samples.append(s)

    def step() -> None:
        losses = model.loss(inputs, samples)
        total = sum(v if v.dim() == 0 else v.sum() for k, v in losses.items() if "loss" in k)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

    for _ in range(2):  # warm-up (allocator, cudnn autotune, lazy init)
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start), {"parameters": sum(p.numel() for p in model.parameters())}


# --- the run --------------------------------------------------------------------------------------------
def build_inputs(args, tmp: Path) -> dict[str, list[Task]]:
    n_png, n_dicom, volumes, slices = (24, 24, 2, 16) if args.quick else (64, 64, 4, 24)
    inputs: dict[str, list[Task]] = {}
    if "png" in args.formats:
        tasks = None
        if args.source in ("auto", "medsynth"):
            # generated once into benchmarks/out (ignored by git), so reruns time the data path, not generation
            tasks = medsynth_tasks(OUT / "medsynth_cache")
            if tasks is None and args.source == "medsynth":
                sys.exit("the medsynth dataset plugin is not available; use --source synthetic")
        inputs["png"] = tasks if tasks is not None else [synthetic_task(tmp / "png", n_png)]
        (tmp / "png").mkdir(exist_ok=True)
    if "dicom" in args.formats:
        (tmp / "dicom").mkdir()
        inputs["dicom"] = [dicom_task(tmp / "dicom", n_dicom)]
    if "nifti" in args.formats:
        inputs["nifti"] = [nifti_task(tmp / "nifti", volumes, slices)]
    return inputs


def print_tables(console: Console, result: dict) -> None:
    table = Table(title=f"loader: images/s of augmented {INPUT_SIZE}-px episodes (cold: decode every image; warm: "
                        "cached), 1 thread per worker")
    for col in ("input", "workers", "kind", "cold img/s", "per worker", "scaling", "warm img/s", "per worker",
                "scaling"):
        table.add_column(col, justify="right")
    for r in result["loader"]:
        cells = [r["input"], str(r["workers"]), r["kind"]]
        for state in ("cold", "warm"):
            scaling = r[f"{state}_scaling"]
            cells += [f"{r[f'{state}_images_per_s']:.1f}", f"{r[f'{state}_per_worker']:.1f}",
                      "" if scaling is None else f"{scaling:.2f}x"]
        table.add_row(*cells)
    console.print(table)
    if result["memory"]:
        mem = Table(title="peak memory above the start (training process RSS + worker processes' PSS): two warm "
                          "passes over the DICOM images, cache on, each in a fresh process")
        for col in ("workers", "kind", "start MiB", "peak above start MiB", "cache MiB (training process)"):
            mem.add_column(col, justify="right")
        for r in result["memory"]:
            mem.add_row(str(r["workers"]), r["kind"], f"{r['start_mib']:.0f}", f"{r['peak_mib']:.0f}",
                        f"{r['cache_mib_in_training_process']:.1f}")
        console.print(mem)
    if result.get("model_steps_per_s"):
        need = result["model_steps_per_s"] * (SUPPORT + QUERY)
        console.print(f"YOLOX-tiny train steps ({result['device_model']}, batch 8): {result['model_steps_per_s']:.2f}/s = "
                      f"{need:.1f} images/s consumed; in-process loader / model: " + ", ".join(
                          f"{r['input']} cold {r['cold_images_per_s'] / need:.1f}x, warm {r['warm_images_per_s'] / need:.1f}x"
                          for r in result["loader"] if r["workers"] == 0))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and meta-batches (a smoke run)")
    parser.add_argument("--source", choices=["auto", "medsynth", "synthetic"], default="auto", help="the PNG input")
    parser.add_argument("--formats", default="png,dicom,nifti", help="inputs to measure (comma-separated)")
    parser.add_argument("--workers", default="1,2,4", help="worker counts to measure besides 0")
    parser.add_argument("--kinds", default="thread,process", help="worker kinds to measure")
    parser.add_argument("--prefetch", type=int, default=2, help="items each worker loads ahead")
    parser.add_argument("--device", default="cpu", help="device of the model step (the data path is CPU)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the training process")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--no-model", action="store_true", help="skip the model step")
    parser.add_argument("--memory-probe", nargs=3, metavar=("FOLDER", "KIND", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.formats = [f for f in args.formats.split(",") if f]
    args.workers = [int(w) for w in args.workers.split(",") if w]
    args.kinds = [k for k in args.kinds.split(",") if k]
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    # 4 worker processes on a 2-core machine is the point of the scaling rows, not a mistake
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    if args.memory_probe:  # one memory measurement, in its own process (memory_rows)
        folder, kind, workers = args.memory_probe
        print(json.dumps(memory_probe(Path(folder), kind, int(workers), args.prefetch, args.augment)))
        return {}
    meta_batches = 6 if args.quick else 20
    console = Console(width=140)
    result: dict = {"input_size": INPUT_SIZE, "episode": {"support": SUPPORT, "query": QUERY}, "meta_batch": META_BATCH,
                    "meta_batches_timed": meta_batches, "augment": args.augment, "threads": args.threads,
                    "prefetch": args.prefetch, "cores": len(os.sched_getaffinity(0)), "loader": [], "memory": []}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = build_inputs(args, Path(tmp))
        result["inputs"] = {name: {"tasks": [t.name for t in tasks], "images": sum(len(t) for t in tasks)}
                            for name, tasks in inputs.items()}
        for name, tasks in inputs.items():
            result["loader"] += loader_table(name, tasks, args, meta_batches)
        if "dicom" in inputs:
            result["memory"] = memory_rows(Path(tmp) / "dicom", args)
    if not args.no_model:
        rate, info = time_model_steps(2 if args.quick else 8, args.device)
        result.update({"model_steps_per_s": rate, "device_model": args.device, "model_parameters": info["parameters"],
                       "model": "yolox_tiny (mmdet), batch 8, forward+backward+SGD"})
    result.update({"torch": torch.__version__, "opencv": cv2.__version__, "python": platform.python_version(),
                   "machine": platform.machine(),
                   # other processes on the machine slow every rate; compare scaling between runs
                   "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None})
    print_tables(console, result)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench_data.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
