"""A run's pictures as PNG files: training curves, confusion matrices, test images with their predictions, the
most confused class pairs, and new photos with their top classes.

Each function takes plain data and an output path and returns the path. Figures are built with matplotlib's
object API on an Agg canvas, never through pyplot, so no display is needed and no state outlives a call.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cifar_jax.evaluate import confusion_matrix, most_confused_pairs
from cifar_jax.rundir import raise_unwritable

DPI = 110
TRAIN_COLOUR = "tab:blue"
TEST_COLOUR = "tab:orange"
WRONG_COLOUR = "#d62728"
RIGHT_COLOUR = "#222222"
OTHER_BAR_COLOUR = "#b0b0b0"


def new_figure(width_inches: float, height_inches: float) -> Figure:
    figure = Figure(figsize=(width_inches, height_inches), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, out_path: str | Path) -> Path:
    path = Path(out_path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, format="png", facecolor="white")
    except OSError as error:  # a full disk, no permission
        raise_unwritable(path, error)
    return path


def _show_image(axes: Axes, image_hwc_uint8: np.ndarray, frame_colour: Optional[str] = None) -> None:
    """A 32x32 image without smoothing (upscaled pixels stay crisp), framed in a colour or not at all."""
    axes.imshow(image_hwc_uint8, interpolation="nearest")
    axes.set_xticks([])
    axes.set_yticks([])
    for spine in axes.spines.values():
        spine.set_visible(frame_colour is not None)
        if frame_colour is not None:
            spine.set_color(frame_colour)
            spine.set_linewidth(3)


# ---------------------------------------------------------------- training curves


def plot_training_curves(history: Sequence[dict], out_path: str | Path, marked_epoch: Optional[int] = None) -> Path:
    """Accuracy and loss per epoch, train and test, side by side; `marked_epoch` gets a dashed line (a checkpoint)."""
    figure = new_figure(10, 4)
    accuracy_axes, loss_axes = figure.subplots(1, 2)
    epochs = [row["epoch"] for row in history]
    for axes, metric, title in ((accuracy_axes, "accuracy", "Accuracy"), (loss_axes, "loss", "Loss (cross-entropy)")):
        for split, colour in (("train", TRAIN_COLOUR), ("test", TEST_COLOUR)):
            values = [row[f"{split}_{metric}"] for row in history]
            label = f"{split} (last {values[-1]:.3f})" if values else split
            axes.plot(epochs, values, marker="o", markersize=4, color=colour, label=label)
        if marked_epoch is not None:
            axes.axvline(marked_epoch, color="grey", linestyle="--", linewidth=1, label=f"checkpoint (epoch {marked_epoch})")
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        if epochs:  # a little room either side; with one epoch the locator would otherwise invent fractions
            axes.set_xlim(min(epochs) - 0.4, max(epochs) + 0.4)
        axes.grid(alpha=0.3)
        axes.legend()
    if not history:
        figure.suptitle("no finished epoch yet")
    return save_figure(figure, out_path)


# ---------------------------------------------------------------- confusion matrices


def row_normalized(confusion: np.ndarray) -> np.ndarray:
    """Each row divided by its sum: the share of a true class that went to each prediction (0 for empty rows)."""
    totals = confusion.sum(axis=1, keepdims=True)
    return np.divide(confusion, totals, out=np.zeros(confusion.shape, np.float64), where=totals > 0)


def plot_confusion_matrix(confusion: np.ndarray, class_names: Sequence[str], out_path: str | Path,
                          normalize: bool = False) -> Path:
    """Heatmap of the confusion matrix (rows true, columns predicted) with every cell's count or row share."""
    counts = np.asarray(confusion)
    values = row_normalized(counts) if normalize else counts
    top = 1.0 if normalize else max(int(values.max()), 1)
    figure = new_figure(7.5, 6.5)
    axes = figure.subplots()
    heatmap = axes.imshow(values, cmap="Blues", vmin=0, vmax=top)
    figure.colorbar(heatmap, ax=axes, shrink=0.85, label="share of the true class" if normalize else "test images")
    ticks = np.arange(len(class_names))
    axes.set_xticks(ticks, class_names, rotation=45, ha="right", rotation_mode="anchor")
    axes.set_yticks(ticks, class_names)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    for (row, column), value in np.ndenumerate(values):
        text = f"{value:.2f}".lstrip("0") if normalize else f"{value:d}"
        axes.text(column, row, text if value else "·", ha="center", va="center", fontsize=8,
                  color="white" if value > top / 2 else "black")
    kind = "row-normalised" if normalize else "counts"
    axes.set_title(f"Confusion matrix, {kind}: {int(counts.sum()):,} test images")
    return save_figure(figure, out_path)


# ---------------------------------------------------------------- test images with predictions


def plot_prediction_grid(images_nhwc_uint8: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                         class_names: Sequence[str], out_path: str | Path, num_images: int = 25, seed: int = 0,
                         columns: int = 5) -> Path:
    """Random test images (fixed seed) titled with predicted and true label; wrong ones in red with a red frame."""
    chosen = np.random.default_rng(seed).choice(len(labels), size=min(num_images, len(labels)), replace=False)
    rows = max(1, -(-len(chosen) // columns))
    figure = new_figure(columns * 1.75, rows * 2.0 + 0.4)
    for axes, index in itertools.zip_longest(figure.subplots(rows, columns, squeeze=False).ravel(), chosen):
        if index is None:
            axes.set_axis_off()
            continue
        wrong = predictions[index] != labels[index]
        colour = WRONG_COLOUR if wrong else RIGHT_COLOUR
        _show_image(axes, images_nhwc_uint8[index], colour if wrong else None)
        axes.set_title(f"pred: {class_names[predictions[index]]}\ntrue: {class_names[labels[index]]}",
                       fontsize=9, color=colour)
    num_wrong = int(sum(predictions[i] != labels[i] for i in chosen))
    figure.suptitle(f"{len(chosen)} random test images: {num_wrong} wrong (in red)")
    return save_figure(figure, out_path)


def _examples_of(labels: np.ndarray, predictions: np.ndarray, true_class: int, predicted_class: int, count: int,
                 rng: np.random.Generator) -> np.ndarray:
    matches = np.flatnonzero((labels == true_class) & (predictions == predicted_class))
    return np.sort(rng.choice(matches, size=min(count, len(matches)), replace=False))


def plot_confused_pairs(images_nhwc_uint8: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                        class_names: Sequence[str], out_path: str | Path, num_pairs: int = 3,
                        examples_per_direction: int = 4, seed: int = 0) -> Path:
    """The class pairs mixed up most (both ways), one row each: images of a taken for b, then of b taken for a."""
    confusion = confusion_matrix(labels, predictions, len(class_names))
    pairs = most_confused_pairs(confusion, num_pairs)
    columns = 2 * examples_per_direction
    figure = new_figure(columns * 1.4, max(len(pairs), 1) * 2.05 + 0.5)
    if not pairs:
        figure.text(0.5, 0.5, "No test image was misclassified.", ha="center", va="center", fontsize=14)
        return save_figure(figure, out_path)
    rng = np.random.default_rng(seed)
    for row_figure, (first, second, _) in zip(figure.subfigures(len(pairs), 1, squeeze=False).ravel(), pairs):
        a, b = class_names[first], class_names[second]
        row_figure.suptitle(f"{a} ↔ {b}:  {confusion[first, second]} {a} images predicted as {b},  "
                            f"{confusion[second, first]} {b} images predicted as {a}", fontsize=10)
        shown = [(index, a, b) for index in _examples_of(labels, predictions, first, second, examples_per_direction, rng)]
        shown += [None] * (examples_per_direction - len(shown))
        shown += [(index, b, a) for index in _examples_of(labels, predictions, second, first, examples_per_direction, rng)]
        for axes, example in itertools.zip_longest(row_figure.subplots(1, columns), shown):
            if example is None:
                axes.set_axis_off()
                continue
            index, true_name, predicted_name = example
            _show_image(axes, images_nhwc_uint8[index])
            axes.set_title(f"{true_name} → {predicted_name}", fontsize=8)
    figure.suptitle("Most confused pairs (true → predicted)", fontsize=12)
    return save_figure(figure, out_path)


# ---------------------------------------------------------------- new photos


def plot_image_predictions(images_nhwc_uint8: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str],
                           titles: Sequence[str], out_path: str | Path, top_k: int = 5) -> Path:
    """Each image (as the model sees it, 32x32) beside a bar chart of its `top_k` most likely classes."""
    figure = new_figure(8, 2.1 * max(len(images_nhwc_uint8), 1) + 0.3)
    grid = figure.subplots(max(len(images_nhwc_uint8), 1), 2, squeeze=False, width_ratios=[1, 2.4])
    for (image_axes, bar_axes), image, probs, title in zip(grid, images_nhwc_uint8, probabilities, titles):
        _show_image(image_axes, image)
        image_axes.set_title(_shortened(title, 28), fontsize=9)
        top = np.argsort(probs)[::-1][:top_k]
        positions = np.arange(len(top))[::-1]  # most likely at the top
        bars = bar_axes.barh(positions, probs[top], color=[TEST_COLOUR] + [OTHER_BAR_COLOUR] * (len(top) - 1))
        bar_axes.bar_label(bars, labels=[f"{p:.1%}" for p in probs[top]], padding=3, fontsize=8)
        bar_axes.set_yticks(positions, [class_names[c] for c in top])
        bar_axes.set_xlim(0, 1.18)
        bar_axes.set_xticks([0, 0.25, 0.5, 0.75, 1.0], ["0", "25%", "50%", "75%", "100%"])
        bar_axes.spines[["top", "right"]].set_visible(False)
        bar_axes.set_title(f"predicted: {class_names[top[0]]}", fontsize=10, loc="left")
    return save_figure(figure, out_path)


def _shortened(text: str, limit: int) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1):]
