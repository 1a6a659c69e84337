"""PNG figures of fitted flows: 2-D densities and image grids (matplotlib, Agg backend)."""
from __future__ import annotations

import os
from typing import Callable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from mpl_toolkits.axes_grid1 import make_axes_locatable  # noqa: E402


def _log_prob_function(distribution_or_log_prob_fn) -> Callable:
    if hasattr(distribution_or_log_prob_fn, "log_prob"):
        return distribution_or_log_prob_fn.log_prob
    if callable(distribution_or_log_prob_fn):
        return distribution_or_log_prob_fn
    raise TypeError(
        "Expected a distribution with a log_prob method or a callable log_prob(x); given "
        f"{type(distribution_or_log_prob_fn).__name__}."
    )


def _default_bounds(points: np.ndarray) -> tuple[float, float, float, float]:
    low = np.percentile(points, 0.5, axis=0)
    high = np.percentile(points, 99.5, axis=0)
    margin = 0.1 * (high - low) + 1e-3
    return (low[0] - margin[0], high[0] + margin[0], low[1] - margin[1], high[1] + margin[1])


def _check_points(points, name: str) -> np.ndarray:
    array = np.asarray(points, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"{name} must have shape [N, 2]; given shape {list(array.shape)}.")
    return array


def plot_density_2d(
    distribution_or_log_prob_fn,
    data,
    samples,
    path: str,
    bounds: Sequence[float] | None = None,
    grid_size: int = 200,
    title: str | None = None,
) -> str:
    """Write a PNG with three panels: the data, the model's samples, its log-density.

    `distribution_or_log_prob_fn` is anything with `.log_prob(x)` or a callable `log_prob(x)`
    taking a float32 `[M, 2]` array. `bounds = (x_min, x_max, y_min, y_max)` defaults to
    the data's 0.5–99.5 percentiles plus a 10% margin. The log-density is shown clipped to
    12 nats below its maximum on the grid. Returns `path`.
    """
    log_prob = _log_prob_function(distribution_or_log_prob_fn)
    data = _check_points(data, "data")
    samples = _check_points(samples, "samples")
    x_min, x_max, y_min, y_max = bounds if bounds is not None else _default_bounds(data)

    axis_x = np.linspace(x_min, x_max, grid_size)
    axis_y = np.linspace(y_min, y_max, grid_size)
    grid_x, grid_y = np.meshgrid(axis_x, axis_y)
    grid = np.stack([grid_x.ravel(), grid_y.ravel()], axis=1).astype(np.float32)
    log_density = np.asarray(log_prob(grid), dtype=np.float64).reshape(grid_x.shape)
    finite = np.isfinite(log_density)
    top = log_density[finite].max() if finite.any() else 0.0
    shown = np.clip(np.where(finite, log_density, top - 12.0), top - 12.0, top)

    figure, axes = plt.subplots(1, 3, figsize=(13.5, 4.5))
    histogram_range = [[x_min, x_max], [y_min, y_max]]
    for ax, points, label in ((axes[0], data, "data"), (axes[1], samples, "model samples")):
        ax.hist2d(points[:, 0], points[:, 1], bins=100, range=histogram_range, cmap="viridis")
        ax.set_title(f"{label} (n={len(points)})")
    contours = axes[2].contourf(grid_x, grid_y, shown, levels=30, cmap="viridis")
    # A colour bar as tall as the panel, whatever the panel's aspect ratio.
    colorbar_axis = make_axes_locatable(axes[2]).append_axes("right", size="5%", pad=0.08)
    figure.colorbar(contours, cax=colorbar_axis, label="log density (nats)")
    axes[2].set_title("model log-density")
    for ax in axes:
        ax.set_xlim(x_min, x_max)
        ax.set_ylim(y_min, y_max)
        ax.set_aspect("equal")
    if title:
        figure.suptitle(title)
    figure.tight_layout(rect=(0.0, 0.0, 1.0, 0.94 if title else 1.0))
    _save(figure, path)
    return path


def plot_image_grid(images, path: str, nrow: int = 8, title: str | None = None) -> str:
    """Write a PNG tiling `images` `[N, H, W, C]` (C = 1 or 3, values in [0, 1]) in rows of `nrow`.

    Values are clipped to [0, 1]. Returns `path`.
    """
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must have shape [N, H, W, C] with C 1 or 3; given shape {list(images.shape)}.")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1; given {nrow}.")
    count, height, width, channels = images.shape
    rows = -(-count // nrow)
    pad = 1
    canvas = np.ones((rows * (height + pad) + pad, nrow * (width + pad) + pad, channels))
    for index, image in enumerate(np.clip(images, 0.0, 1.0)):
        top = pad + (index // nrow) * (height + pad)
        left = pad + (index % nrow) * (width + pad)
        canvas[top : top + height, left : left + width] = image
    figure, ax = plt.subplots(figsize=(max(2.0, 0.6 * nrow), max(2.0, 0.6 * rows)))
    ax.imshow(canvas[..., 0] if channels == 1 else canvas, cmap="gray" if channels == 1 else None,
              vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.axis("off")
    if title:
        ax.set_title(title)
    figure.tight_layout()
    _save(figure, path)
    return path


def _save(figure, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
