"""Pictures of dataset similarity: averaged histograms, distance heatmaps, t-SNE of CNN embeddings.

Also a compact exact t-SNE (:func:`tsne`, numpy only; scikit-learn is not a dependency). It is O(n^2) in
memory and time, fine for the few hundred points the similarity command embeds (50 images x 7 datasets).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ t-SNE
def _conditional_probabilities(d2: np.ndarray, perplexity: float, tol: float = 1e-5, max_iter: int = 100) -> np.ndarray:
    """Row-wise Gaussian affinities whose entropy matches ``log(perplexity)`` (binary search on beta = 1/2s^2)."""
    n = d2.shape[0]
    target = np.log(perplexity)
    p = np.zeros((n, n))
    for i in range(n):
        di = np.delete(d2[i], i)
        di = di - di.min()  # shift for numerical stability; does not change the normalised row
        lo, hi, beta = 0.0, np.inf, 1.0
        for _ in range(max_iter):
            w = np.exp(-di * beta)
            s = w.sum()
            if s == 0:
                s, w = 1e-300, np.full_like(di, 1e-300)
            h = np.log(s) + beta * (di * w).sum() / s  # entropy of the row
            if abs(h - target) < tol:
                break
            if h > target:  # too flat: narrow the kernel
                lo = beta
                beta = beta * 2 if hi == np.inf else (beta + hi) / 2
            else:
                hi = beta
                beta = (beta + lo) / 2
        p[i, np.arange(n) != i] = w / s
    return p


def tsne(x: np.ndarray, dim: int = 2, perplexity: float = 30.0, n_iter: int = 1000, seed: int = 0,
         learning_rate: float | None = None) -> np.ndarray:
    """Exact t-SNE (van der Maaten & Hinton, 2008): ``(n, D)`` -> ``(n, dim)``.

    Standard recipe: perplexity-calibrated Gaussian affinities (perplexity clipped to ``(n - 1) / 3``),
    symmetrised; Student-t similarities in the embedding; gradient descent with momentum 0.5 then 0.8,
    early exaggeration 12 for the first 250 iterations and per-parameter adaptive gains. Initialisation: the
    top principal components scaled to standard deviation 1e-4 (deterministic; ``seed`` breaks ties when
    the data has fewer than ``dim`` directions of variance).
    """
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n < 3:
        raise ValueError(f"t-SNE needs at least 3 points, got {n}")
    perplexity = float(min(perplexity, (n - 1) / 3))
    sq = (x ** 2).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)
    p = _conditional_probabilities(d2, perplexity)
    p = (p + p.T) / (2 * n)
    p = np.maximum(p, 1e-12)

    rng = np.random.default_rng(seed)
    xc = x - x.mean(0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    y = xc @ vt[:dim].T
    if y.shape[1] < dim or np.allclose(y.std(0), 0):
        y = rng.standard_normal((n, dim))
    y = y + 1e-6 * rng.standard_normal(y.shape)
    y = y / y.std(0) * 1e-4
    lr = learning_rate if learning_rate is not None else max(n / 12.0 / 4.0, 50.0)
    update = np.zeros_like(y)
    gains = np.ones_like(y)
    for it in range(n_iter):
        exaggeration = 12.0 if it < 250 else 1.0
        momentum = 0.5 if it < 250 else 0.8
        sy = (y ** 2).sum(1)
        num = 1.0 / (1.0 + np.maximum(sy[:, None] + sy[None, :] - 2 * y @ y.T, 0.0))
        np.fill_diagonal(num, 0.0)
        q = np.maximum(num / num.sum(), 1e-12)
        pq = (exaggeration * p - q) * num
        grad = 4.0 * ((np.diag(pq.sum(1)) - pq) @ y)
        same_sign = np.sign(grad) == np.sign(update)
        gains = np.where(same_sign, gains * 0.8, gains + 0.2).clip(0.01, None)
        update = momentum * update - lr * gains * grad
        y = y + update
        y = y - y.mean(0)
    return y


# ------------------------------------------------------------------------------------------------ plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _colours(n: int):
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _with_count(name: str, counts: dict[str, int] | None) -> str:
    """``name (n=12)`` when the number of images behind ``name`` is known."""
    return f"{name} (n={counts[name]})" if counts and name in counts else name


def plot_histograms(histograms: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path,
                    title: str = "Average grayscale histograms (pixel values 1-254)",
                    counts: dict[str, int] | None = None) -> Path:
    """One line per dataset: ``histograms[name] = (bin centres in grey levels, normalised histogram)``;
    ``counts[name]``, when given, is the number of images averaged (shown in the legend)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    for (name, (centres, hist)), colour in zip(histograms.items(), _colours(len(histograms))):
        width = float(centres[1] - centres[0]) if len(centres) > 1 else 1.0
        ax.plot(centres, np.asarray(hist) / width, label=_with_count(name, counts), color=colour, lw=1.6)
    ax.set_xlabel("pixel value (grey level, 8-bit)")
    ax.set_ylabel("fraction of pixels per grey level")
    ax.set_xlim(1, 254)
    ax.set_title(title)
    ax.legend(title="dataset", fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_heatmap(names: list[str], matrix: np.ndarray, metric: str, unit: str, path: str | Path,
                 counts: dict[str, int] | None = None) -> Path:
    """Pairwise distance matrix as an annotated heatmap (smaller = more similar); ``counts[name]``, when
    given, is the number of images each dataset contributed (shown in the tick labels)."""
    plt = _pyplot()
    n = len(names)
    fig, ax = plt.subplots(figsize=(1.1 * n + 3, 0.9 * n + 2.5))
    im = ax.imshow(matrix, cmap="viridis_r")
    labels = [_with_count(name, counts) for name in names]
    ax.set_xticks(range(n), labels, rotation=40, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("dataset")
    ax.set_ylabel("dataset")
    vmax = float(np.max(matrix)) if matrix.size else 0.0
    for i in range(n):
        for j in range(n):
            v = matrix[i, j]
            ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=8,
                    color="white" if vmax and v > 0.5 * vmax else "black")
    cbar = fig.colorbar(im, ax=ax)
    cbar.set_label(f"{metric} distance ({unit})")
    ax.set_title(f"Pairwise dataset distance: {metric} (smaller = more similar)")
    return _save(fig, path)


def plot_tsne(embeddings: dict[str, np.ndarray], path: str | Path, seed: int = 0, perplexity: float = 30.0,
              note: str = "") -> Path:
    """2-D t-SNE of every dataset's CNN embeddings together, coloured by dataset."""
    plt = _pyplot()
    names = list(embeddings)
    x = np.concatenate([embeddings[n] for n in names])
    owner = np.concatenate([[i] * len(embeddings[n]) for i, n in enumerate(names)])
    # standardise features so that no single channel's scale dominates the neighbourhoods
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    y = tsne(x, perplexity=perplexity, seed=seed)
    fig, ax = plt.subplots(figsize=(8, 7))
    for i, (name, colour) in enumerate(zip(names, _colours(len(names)))):
        pts = y[owner == i]
        ax.scatter(pts[:, 0], pts[:, 1], s=18, color=colour, label=f"{name} (n={len(pts)})", alpha=0.85)
    ax.set_xlabel("t-SNE dimension 1 (arbitrary units)")
    ax.set_ylabel("t-SNE dimension 2 (arbitrary units)")
    import textwrap

    wrapped = "\n".join(textwrap.wrap(note, 90))
    ax.set_title("t-SNE of CNN image embeddings (perplexity %g)" % min(perplexity, (len(x) - 1) / 3)
                 + (f"\n{wrapped}" if wrapped else ""), fontsize=10)
    ax.legend(title="dataset", fontsize="small", markerscale=1.5)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log.info("wrote %s", path)
    return path
