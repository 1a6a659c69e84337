"""PNG figures of fitted flows: 2-D densities and image grids (matplotlib, Agg backend)."""
from __future__ import annotations

import os
from typing import Callable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from mpl_toolkits.axes_grid1 import make_axes_locatable  # noqa: E402

from tfp_flows.checks import check_integer, check_number, check_positive_integer, check_samples  # noqa: E402

MAX_GRID_SIZE = 2000
"""Largest `grid_size` of `plot_density_2d` (a 2000 × 2000 grid is 4 million log_prob calls)."""


def _log_prob_function(distribution_or_log_prob_fn) -> Callable:
    if hasattr(distribution_or_log_prob_fn, "log_prob"):
        return distribution_or_log_prob_fn.log_prob
    if callable(distribution_or_log_prob_fn):
        return distribution_or_log_prob_fn
    raise TypeError(
        "`distribution_or_log_prob_fn` must be a distribution with a log_prob method or a "
        f"callable log_prob(x); given {type(distribution_or_log_prob_fn).__name__}."
    )


def _default_bounds(points: np.ndarray) -> tuple[float, float, float, float]:
    low = np.percentile(points, 0.5, axis=0)
    high = np.percentile(points, 99.5, axis=0)
    margin = 0.1 * (high - low) + 1e-3
    return (low[0] - margin[0], high[0] + margin[0], low[1] - margin[1], high[1] + margin[1])


def _check_bounds(bounds) -> tuple[float, float, float, float]:
    expected = "None or a sequence (x_min, x_max, y_min, y_max) of 4 finite numbers"
    if isinstance(bounds, np.ndarray):
        bounds = bounds.tolist() if bounds.ndim == 1 else bounds
    if not isinstance(bounds, (list, tuple)):
        raise TypeError(f"`bounds` must be {expected}; given {bounds!r} ({type(bounds).__name__}).")
    if len(bounds) != 4:
        raise ValueError(f"`bounds` must be {expected}; given {len(bounds)} value(s): {bounds!r}.")
    values = tuple(check_number(f"bounds[{i}]", value) for i, value in enumerate(bounds))
    if not (values[0] < values[1] and values[2] < values[3]):
        raise ValueError(f"`bounds` must have x_min < x_max and y_min < y_max; given {bounds!r}.")
    return values


def _check_path(path) -> str:
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise TypeError(f"`path` must be a non-empty str or os.PathLike (the PNG to write); "
                        f"given {path!r} ({type(path).__name__}).")
    return os.fspath(path)


def _check_title(title) -> str | None:
    if title is not None and not isinstance(title, str):
        raise TypeError(f"`title` must be None or a str; given {title!r} ({type(title).__name__}).")
    return title


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
    12 nats below its maximum on the grid; `grid_size` is an integer in [2, 2000].
    `data` and `samples` are finite real `[N, 2]` arrays; `log_prob` must return `M` real
    values (NaN/−inf are shown as the lowest level). Returns `path`.
    """
    log_prob = _log_prob_function(distribution_or_log_prob_fn)
    data = check_samples(data, (2,), name="data").astype(np.float64)
    samples = check_samples(samples, (2,), name="samples").astype(np.float64)
    grid_size = check_integer("grid_size", grid_size, 2, MAX_GRID_SIZE)
    title, path = _check_title(title), _check_path(path)
    x_min, x_max, y_min, y_max = _check_bounds(bounds) if bounds is not None else _default_bounds(data)

    axis_x = np.linspace(x_min, x_max, grid_size)
    axis_y = np.linspace(y_min, y_max, grid_size)
    grid_x, grid_y = np.meshgrid(axis_x, axis_y)
    grid = np.stack([grid_x.ravel(), grid_y.ravel()], axis=1).astype(np.float32)
    values = np.asarray(log_prob(grid))
    if values.shape not in ((len(grid),), (len(grid), 1)) or values.dtype.kind not in "fiu":
        raise ValueError(
            f"`distribution_or_log_prob_fn` must return {len(grid)} real log-densities for a "
            f"[{len(grid)}, 2] grid; given an array of shape {list(values.shape)} and dtype "
            f"{values.dtype}.")
    log_density = values.astype(np.float64).reshape(grid_x.shape)
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

    `images` must be finite and real (N >= 1); values are clipped to [0, 1]. Returns `path`.
    """
    array = check_samples(images, None, name="images")
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ValueError(f"images must have shape [N, H, W, C] with C 1 or 3; given shape {list(array.shape)}.")
    images = array.astype(np.float64)
    nrow = check_positive_integer("nrow", nrow)
    title, path = _check_title(title), _check_path(path)
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
