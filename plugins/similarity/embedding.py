"""``embedding``: distance between the distributions of CNN embeddings of two datasets' images.

Each dataset is summarised by the embeddings of ``sample_size`` sampled images (seeded): every image is
letterboxed to the input size (no augmentation) and passed through a feature extractor that returns one
vector per image (global average pooled). Two distances between embedding clouds are offered:

- ``ot`` (default): the optimal-transport (earth mover's, Wasserstein-1) distance between the two clouds with
  uniform weights and Euclidean ground cost, solved exactly with POT (``ot.emd2``). It makes no assumption
  on the shape of the distributions and is well defined for the method's 50 images per dataset.
- ``frechet``: the Fréchet distance between Gaussian fits,
  ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` (as FID), with ``scipy.linalg.sqrtm`` on
  covariances regularised by ``eps * I``. With 50 images and 512-D features a covariance has rank <= 49,
  so the two clouds are first projected on the top principal components of their pooled, centred data
  (at most ``min(n_a, n_b) - 1`` of them, or ``pca_dim``); the distance is therefore a per-pair estimate
  in that subspace. Its unit is squared feature units.

Why ``ot`` is the default: the Fréchet estimate needs a covariance matrix that 50 samples cannot pin down
in hundreds of dimensions (strongly biased, sample-size dependent) and assumes Gaussian clouds, whereas the
OT distance uses every sample as is, has the same unit as the features, and is symmetric and zero for
identical clouds by construction.

**Feature extractor.** ``extractor: auto`` uses the configured detector's ``features(batch)`` when the core
provides one (``SimilarityContext.make_feature_extractor``), otherwise a torchvision ResNet-18 trunk.
ResNet weights come from ``weights: PATH`` (nothing is downloaded): a torchvision ImageNet ResNet state dict or
a detector checkpoint with a ResNet backbone (megatron or mmdet model zoo; :func:`resnet_weights`). Without
weights the trunk is a fixed-seed random initialisation, and :meth:`describe` says so: random convolutional
features still respond to texture, contrast and edge statistics, so the distance still separates modalities
that look different, but it knows nothing about semantic content — give trained weights for that.

The embeddings are kept in the summary (``EmbeddingSummary.features``) for the t-SNE picture.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Literal

import numpy as np
import ot
import torch
from pydantic import Field

from megatron import hookimpl
from megatron.errors import ConfigError, DataError, MegatronError
from megatron.training.weights import read_checkpoint_file
from megatron.api.similarity import SimilarityMetric, SimilarityOptions, load_image_checked, sample_indices

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EmbeddingOptions(SimilarityOptions):
    distance: Literal["ot", "frechet"] = Field("ot", description="ot: exact optimal transport (POT emd2, Euclidean "
                                               "cost) between the embedding clouds; frechet: Fréchet distance between Gaussian fits")
    extractor: Literal["auto", "detector", "resnet18"] = Field(
        "auto", description="auto: the configured detector's features when available, else ResNet-18")
    weights: Path | None = Field(None, description="local weights for the ResNet extractor: a torchvision ImageNet "
                                 "ResNet state dict (18/34/50/101) or a detector checkpoint with a ResNet backbone "
                                 "(megatron or mmdet model zoo: its backbone is used); without it a fixed-seed random "
                                 "ResNet-18 is used, with a warning (distances from an untrained network say little)")
    input_size: int | None = Field(None, ge=32, description="letterbox size in pixels (default: data.input_size)")
    batch_size: int = Field(16, ge=1, description="images per forward pass")
    eps: float = Field(1e-6, gt=0, description="frechet: ridge added to each covariance before the matrix square root")
    pca_dim: int | None = Field(None, ge=1, description="frechet: principal components kept (default and maximum: "
                                "min(n_a, n_b) - 1)")


@dataclass
class EmbeddingSummary:
    task: str
    features: np.ndarray  # (n, D) float64, one row per sampled image
    image_ids: list[int]
    extractor: str


def letterbox(image: np.ndarray, size: int) -> np.ndarray:
    """``(3, size, size)`` float32 in [0, 255]: gray/RGB image scaled to fit, centred, zero padded.

    Used only when :mod:`megatron.data.preprocess` is not available."""
    import cv2

    from megatron.api.similarity import to_gray_uint8

    if image.ndim == 2 or image.dtype != np.uint8:
        g = to_gray_uint8(image)
        image = np.repeat(g[:, :, None], 3, axis=2)
    h, w = image.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = cv2.resize(image[:, :, :3], (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    out = np.zeros((size, size, 3), np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = resized
    return out.transpose(2, 0, 1)


def _make_preprocess(size: int) -> Callable[[np.ndarray], np.ndarray]:
    try:
        from megatron.data.preprocess import Preprocessor
    except ImportError:
        return lambda img: letterbox(img, size)
    pre = Preprocessor(size, clahe=False, augment=False, cache_size=0)
    empty_boxes, empty_labels = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    return lambda img: pre(img, empty_boxes, empty_labels).image.numpy()


#: torchvision ResNet depth from (blocks in layer3, bottleneck blocks)
RESNET_DEPTHS = {(2, False): 18, (6, False): 34, (6, True): 50, (23, True): 101, (36, True): 152}


def resnet_weights(path: Path) -> tuple[dict[str, torch.Tensor], int, str]:
    """A ResNet trunk's weights from ``path``: a torchvision ImageNet ResNet state dict, or a detector checkpoint
    (megatron, mmdet/model zoo) whose backbone is a ResNet (its ``backbone.*`` weights; mmdet's ResNet names its
    layers as torchvision does). Returns (state dict in torchvision names, depth, what the weights are)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"similarity.options.embedding.weights: {path} does not exist; give a local ResNet state_dict "
                          "or a detector checkpoint with a ResNet backbone (nothing is downloaded)")
    try:
        obj = read_checkpoint_file(path)
    except MegatronError as exc:
        raise ConfigError(f"similarity.options.embedding.weights: {exc}") from exc
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"similarity.options.embedding.weights: {path} holds no state dict of tensors")
    state = {k.removeprefix("module.").removeprefix("model."): v for k, v in state.items()}
    kind = "ImageNet ResNet state dict"
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        kind = "detector backbone"
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("layer3.")}
    key = (max(blocks) + 1 if blocks else 0, "layer1.0.conv3.weight" in state)
    if "conv1.weight" not in state or key not in RESNET_DEPTHS:
        raise ConfigError(f"similarity.options.embedding.weights: {path} is not a ResNet-18/34/50/101 ({kind}: no torchvision "
                          f"ResNet layout, e.g. keys {sorted(state)[:3]}); give a torchvision ResNet state dict or a "
                          "detector checkpoint with a ResNet backbone, or use extractor: detector")
    return state, RESNET_DEPTHS[key], kind


class ResNetTrunk(torch.nn.Module):
    """A torchvision ResNet without its classifier: (B, 3, S, S) [0, 255] -> (B, 512 or 2048). ResNet-18 with a
    fixed-seed random initialisation without ``weights``; else the depth the weights file has."""

    def __init__(self, weights: Path | None, seed: int):
        super().__init__()
        import torchvision  # optional dependency: only this extractor needs it

        state, depth, self.weights_kind = (None, 18, "random") if weights is None else resnet_weights(weights)
        self.depth = depth
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        net.fc = torch.nn.Identity()
        if state is not None:
            missing, unexpected = net.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ConfigError(f"similarity.options.embedding.weights: {weights} does not fit a ResNet-{depth} "
                                  f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
        self.net = net.eval()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def ot_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Exact W1 between two point clouds, uniform weights, Euclidean ground cost (POT ``emd2``)."""
    from scipy.spatial.distance import cdist

    cost = cdist(a, b, metric="euclidean")  # exact differences (ot.dist expands |a|^2+|b|^2-2ab: round-off)
    return float(ot.emd2(np.full(len(a), 1.0 / len(a)), np.full(len(b), 1.0 / len(b)), cost))


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: float = 1e-6, pca_dim: int | None = None) -> float:
    """Fréchet distance between Gaussian fits of two clouds, in a shared PCA subspace when D is too large."""
    from scipy import linalg

    if len(a) < 2 or len(b) < 2:
        raise DataError("frechet distance needs at least 2 embeddings per dataset; raise sample_size")
    k = min(a.shape[1], min(len(a), len(b)) - 1)
    if pca_dim is not None:
        k = min(k, pca_dim)
    if k < a.shape[1]:
        pooled = np.concatenate([a, b])
        centre = pooled.mean(axis=0)
        _, _, vt = np.linalg.svd(pooled - centre, full_matrices=False)
        basis = vt[:k].T
        a, b = (a - centre) @ basis, (b - centre) @ basis
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    ridge = eps * np.eye(a.shape[1])
    s_a = np.atleast_2d(np.cov(a, rowvar=False)) + ridge
    s_b = np.atleast_2d(np.cov(b, rowvar=False)) + ridge
    covmean = linalg.sqrtm(s_a @ s_b)
    covmean = np.real(covmean)  # imaginary parts are round-off for PSD products
    d = float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2.0 * np.trace(covmean))
    return max(d, 0.0)


class EmbeddingSimilarity(SimilarityMetric):
    """Distance between the CNN-embedding distributions of two datasets (OT or Fréchet).

    Example::

        similarity:
          metrics: [embedding]
          options:
            embedding: {distance: ot, extractor: resnet18, weights: /models/resnet18.pth}
    """

    PLUGIN_NAME: ClassVar[str] = "embedding"
    UNIT: ClassVar[str] = "feature units"
    Options: ClassVar[type[EmbeddingOptions]] = EmbeddingOptions
    options: EmbeddingOptions

    def __init__(self, options=None, ctx=None):
        super().__init__(options, ctx)
        self._extractor: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._extractor_desc = ""

    @property
    def unit(self) -> str:
        return "squared feature units" if self.options.distance == "frechet" else "feature units"

    def _get_extractor(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if self._extractor is not None:
            return self._extractor
        o, ctx = self.options, self.ctx
        use_detector = o.extractor == "detector" or (o.extractor == "auto" and ctx.make_feature_extractor is not None)
        if use_detector:
            if ctx.make_feature_extractor is None:
                raise ConfigError("similarity.options.embedding.extractor is 'detector' but no detector feature "
                                  "extractor is available here; use 'resnet18' or 'auto'")
            self._extractor = ctx.make_feature_extractor()
            self._extractor_desc = ctx.feature_extractor_desc or "features of the configured detector"
        else:
            module = ResNetTrunk(o.weights, ctx.seed).to(ctx.device)
            self._extractor = module
            self._extractor_desc = (f"ResNet-{module.depth} trunk with weights from {o.weights} ({module.weights_kind})"
                                    if o.weights is not None else
                                    f"ResNet-18 trunk with RANDOM weights (seed {ctx.seed}; no `weights` given): "
                                    "captures texture/contrast statistics only, not semantics")
            if o.weights is None:
                log.warning("embedding similarity: %s", self._extractor_desc)
        return self._extractor

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        """``(n, D)`` embeddings of raw images (letterboxed to the input size)."""
        size = self.options.input_size or self.ctx.input_size
        prep = _make_preprocess(size)
        extractor = self._get_extractor()
        out = []
        with torch.inference_mode():
            for start in range(0, len(images), self.options.batch_size):
                chunk = images[start:start + self.options.batch_size]
                x = torch.from_numpy(np.stack([prep(im) for im in chunk])).float().to(self.ctx.device)
                f = extractor(x)
                out.append(f.reshape(len(chunk), -1).double().cpu().numpy())
        return np.concatenate(out)

    def summarize(self, task) -> EmbeddingSummary:
        indices = sample_indices(task, self.options.sample_size, self.ctx.seed)
        feats = []
        bs = self.options.batch_size
        for start in range(0, len(indices), bs):  # decode a batch at a time to bound memory
            feats.append(self.embed([load_image_checked(task, i) for i in indices[start:start + bs]]))
        return EmbeddingSummary(task=task.name, features=np.concatenate(feats),
                                image_ids=[task.records[i].image_id for i in indices], extractor=self._extractor_desc)

    def distance(self, a: EmbeddingSummary, b: EmbeddingSummary) -> float:
        if a.features.shape[1] != b.features.shape[1]:
            raise ValueError("embeddings of different dimension cannot be compared")
        if self.options.distance == "frechet":
            return frechet_distance(a.features, b.features, self.options.eps, self.options.pca_dim)
        return ot_distance(a.features, b.features)

    def describe(self) -> str:
        self._get_extractor()
        return f"{self.options.distance} distance between up to {self.options.sample_size} sampled embeddings/dataset; {self._extractor_desc}"


@hookimpl
def megatron_register_similarity_metrics() -> list[type]:
    return [EmbeddingSimilarity]
