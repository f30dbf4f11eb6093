"""``volume``: CT / MR volumes (NIfTI or DICOM series) as one 2D / 2.5D slice task (megatron.data.volumes)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from megatron import hookimpl
from megatron.api.dataset import DatasetOptions, DatasetPlugin, tasks_or_raise
from megatron.data.problems import Problem
from megatron.data.volumes import (AXES, CT_WINDOWS, Intensity, SliceSettings, VolumeAnnotations,
                                   read_volume_task, volume_task_name)
from megatron.types import Task

#: the intensity option's names: percentile, then the named CT windows (megatron.data.volumes.CT_WINDOWS)
IntensityName = Literal[("percentile",) + tuple(CT_WINDOWS)]  # type: ignore[valid-type]
AxisName = Literal[tuple(AXES)]  # type: ignore[valid-type]


class VolumeDataset(DatasetPlugin):
    """Volumes sliced into a detection task: every slice with a lesion, plus a share of lesion-free ones.

    Reads NIfTI files (nibabel) or DICOM series (pydicom: one series per folder, slices ordered by position,
    Hounsfield units for CT), reoriented to RAS. Boxes come from label maps on the same grid (connected
    components per class and slice) or from a LUNA16-style CSV of spheres in world coordinates. Every slice of
    a volume is in the volume's group (its patient when DICOM names one), so a volume never straddles two
    splits. Each record keeps its volume, slice index, spacing and affine (``ImageRecord.meta``), so
    `megatron evaluate` can link slice detections back into 3D candidates and FROC per scan.

    Example (config)::

        data:
          datasets:
            - plugin: volume        # a decathlon-style task: imagesTr/ + labelsTr/
              options: {root: data/Task06_Lung/imagesTr, labels: data/Task06_Lung/labelsTr,
                        classes: {1: tumour}, intensity: lung, channels: 2.5d, empty_fraction: 0.1}
            - plugin: volume        # LUNA16-style: scans + annotations.csv (seriesuid, coordX..Z mm, diameter_mm)
              options: {root: data/luna/scans, lesions_csv: data/luna/annotations.csv, intensity: lung}
    """

    PLUGIN_NAME = "volume"

    class Options(DatasetOptions):
        root: Path = Field(description="a NIfTI file (.nii / .nii.gz), a folder of them (searched recursively; the "
                           "volume id is the file name without suffix), or a folder of DICOM series (one series "
                           "per folder; the volume id is the SeriesInstanceUID)")
        format: Literal["auto", "nifti", "dicom"] = Field("auto", description="what root holds (auto: NIfTI "
                                                          "files if there are any, else DICOM series)")
        series_uid: list[str] | None = Field(None, description="DICOM: the SeriesInstanceUID(s) to read where a "
                                             "folder mixes series (a mixed folder without it is an error)")
        labels: Path | None = Field(None, description="folder of label-map NIfTI files on the images' grids, named "
                                    "like the image (or `<volume id>.nii.gz`); shape and affine must match")
        classes: dict[int, str | None] = Field({1: "lesion"}, description="with labels: label value -> class name "
                                               "(null: ignore that value); a value in a label map with no entry is "
                                               "an error")
        min_component_size: int = Field(1, ge=1, description="with labels: connected components (per slice) "
                                        "smaller than this many pixels are dropped")
        lesions_csv: Path | None = Field(None, description="LUNA16-style CSV: seriesuid, coordX, coordY, coordZ "
                                         "(world mm), diameter_mm; each sphere becomes a box on every slice it "
                                         "crosses")
        csv_space: Literal["LPS", "RAS"] = Field("LPS", description="world convention of the CSV coordinates "
                                                 "(LUNA16, DICOM and ITK use LPS; nibabel uses RAS)")
        lesion_class: str = Field("lesion", description="with lesions_csv: the class name of its lesions")
        class_column: str | None = Field(None, description="with lesions_csv: a column holding each lesion's "
                                         "class name instead")
        axis: AxisName = Field("axial", description="slicing axis (of the RAS "
                                                              "volume)")
        channels: Literal["2d", "2.5d"] = Field("2d", description="2d: the slice in grey; 2.5d: the slice and its "
                                                "neighbours (`neighbour_offset` away) as the three channels")
        neighbour_offset: int = Field(1, ge=1, description="2.5d: how many slices away the neighbours are")
        intensity: IntensityName | tuple[float, float] = Field(
            "percentile", description="CT: a named window in Hounsfield units (lung -600/1500, mediastinum "
            "50/350, soft_tissue 40/400, bone 400/1800, brain 40/80) or [centre, width]; MR: percentile (the "
            "volume's own percentiles)")
        percentiles: tuple[float, float] = Field((0.5, 99.5), description="intensity percentile: the low and "
                                                 "high percentiles mapped to 0 and 255")
        empty_fraction: float = Field(0.1, ge=0.0, le=1.0, description="share of each volume's lesion-free slices "
                                      "that become images too (0: none, 1: every slice)")
        seed: int = Field(0, description="seed of the lesion-free slice draw")
        name: str | None = Field(None, description="task name (default: the root folder's name)")
        modality: str = Field("", description="imaging modality, informative (default: the DICOM Modality)")
        cache_volumes: int = Field(4, ge=1, description="decoded volumes kept per process (memory: one uint8 copy "
                                   "of each)")

        @model_validator(mode="after")
        def _consistent(self):
            if self.labels is not None and self.lesions_csv is not None:
                raise ValueError("give either labels (label maps) or lesions_csv, not both")
            if not 0.0 <= self.percentiles[0] < self.percentiles[1] <= 100.0:
                raise ValueError(f"percentiles {list(self.percentiles)}: need 0 <= low < high <= 100")
            if not isinstance(self.intensity, str) and not self.intensity[1] > 0:
                raise ValueError(f"intensity window [centre, width] {list(self.intensity)}: the width must be > 0")
            return self

    def settings(self) -> tuple[VolumeAnnotations, SliceSettings]:
        o = self.options
        annotations = VolumeAnnotations(
            label_dir=Path(o.labels).expanduser() if o.labels else None,
            lesion_csv=Path(o.lesions_csv).expanduser() if o.lesions_csv else None, classes=dict(o.classes),
            csv_class=o.lesion_class, csv_class_column=o.class_column, csv_space=o.csv_space,
            min_size=o.min_component_size)
        settings = SliceSettings(axis=o.axis, intensity=Intensity.from_option(o.intensity, o.percentiles),
                                 offset=o.neighbour_offset if o.channels == "2.5d" else None,
                                 empty_fraction=o.empty_fraction, seed=o.seed, cache_size=o.cache_volumes)
        return annotations, settings

    def load_with_problems(self) -> list[tuple[Task, list[Problem]]]:
        o = self.options
        root = Path(o.root).expanduser()
        annotations, settings = self.settings()
        name = volume_task_name(root, o.name)
        return [read_volume_task(root, name, annotations, settings, kind=o.format, series_uid=o.series_uid,
                                 modality=o.modality, source=f"volume:{root}")]

    def load(self) -> list[Task]:
        return tasks_or_raise(self.load_with_problems(), str(Path(self.options.root).expanduser()))


@hookimpl
def megatron_register_datasets() -> list[type]:
    return [VolumeDataset]
