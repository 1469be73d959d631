"""A run at a glance: evaluate one checkpoint, draw every plot into WORKDIR/plots/, and write WORKDIR/report.md,
a one-page summary that reads well on GitHub (tables, and the plots embedded by relative links).
"""
from __future__ import annotations

import dataclasses
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from cifar_jax import plots, rundir, summaries
from cifar_jax.errors import InputError
from cifar_jax.evaluate import EvaluationResult, dataset_for, evaluate_restored, restore_run
from cifar_jax.models import count_params
from cifar_jax.predict import Predictor, decoded_files, image_files

# One row of the new-images plot each; more would make a figure too tall to read.
MAX_PLOTTED_PHOTOS = 24


@dataclasses.dataclass
class PhotoPredictions:
    """New images as the model sees them (32x32 RGB) and its class probabilities for each."""

    names: list[str]
    images_nhwc_uint8: np.ndarray
    probabilities: np.ndarray


@dataclasses.dataclass
class RunReport:
    report: Path
    plots: dict[str, Path]
    evaluation: EvaluationResult


# ---------------------------------------------------------------- inputs


def predict_photos(workdir: Path, step: int, paths: Sequence[str | Path], num_devices: Optional[int] = None,
                   decode_workers: Optional[int] = None) -> Optional[PhotoPredictions]:
    """The checkpoint's class probabilities for image files (folders walked, like `predict`, decoded on every core),
    with the 32x32 images the model saw: the first MAX_PLOTTED_PHOTOS that can be read (a warning names each one that
    cannot); None if none can."""
    readable, names = [], []
    for path, image in decoded_files(image_files(paths), decode_workers, ahead=MAX_PLOTTED_PHOTOS):
        if len(readable) == MAX_PLOTTED_PHOTOS:
            warnings.warn(f"--images: plotting the first {MAX_PLOTTED_PHOTOS} images; `cifar-jax predict` "
                          "classifies them all")
            break
        if isinstance(image, InputError):
            warnings.warn(f"--images: left out {image}")
            continue
        readable.append(image)
        names.append(path.name)
    if not readable:
        return None
    predictor = Predictor.from_checkpoint(workdir, step=step, num_devices=num_devices)
    images = np.stack(readable)
    return PhotoPredictions(names, images, predictor.probabilities(images))


# ---------------------------------------------------------------- plots


def draw_plots(plots_dir: Path, history: list[dict], result: EvaluationResult, test_images_nhwc_uint8: np.ndarray,
               marked_epoch: Optional[int] = None, photos: Optional[PhotoPredictions] = None) -> dict[str, Path]:
    """Every plot of a run, as {plot name: PNG path}."""
    path = {name: plots_dir / file for name, file in rundir.PLOT_FILES.items()}
    names, labels, predictions = result.class_names, result.labels, result.predictions
    drawn = {
        "training_curves": plots.plot_training_curves(history, path["training_curves"], marked_epoch),
        "confusion_matrix": plots.plot_confusion_matrix(result.confusion_matrix, names, path["confusion_matrix"]),
        "confusion_matrix_normalized": plots.plot_confusion_matrix(
            result.confusion_matrix, names, path["confusion_matrix_normalized"], normalize=True),
        "test_predictions": plots.plot_prediction_grid(test_images_nhwc_uint8, labels, predictions, names,
                                                       path["test_predictions"]),
        "confused_pairs": plots.plot_confused_pairs(test_images_nhwc_uint8, labels, predictions, names,
                                                    path["confused_pairs"]),
    }
    if photos is not None:
        drawn["image_predictions"] = plots.plot_image_predictions(
            photos.images_nhwc_uint8, photos.probabilities, names, photos.names, path["image_predictions"])
    return drawn


# ---------------------------------------------------------------- report.md


def is_synthetic(data_source: str) -> bool:
    return "synthetic" in data_source.lower()


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def _image_link(plot_paths: dict[str, Path], name: str, alt: str, workdir: Path) -> str:
    """Markdown for an embedded plot, linked relative to the report; empty if that plot was not drawn."""
    if name not in plot_paths:
        return ""
    return f"![{alt}]({plot_paths[name].relative_to(workdir).as_posix()})"


def _image(plot_paths: dict[str, Path], name: str, alt: str, workdir: Path) -> list[str]:
    link = _image_link(plot_paths, name, alt, workdir)
    return [link, ""] if link else []


def _epoch_metrics(metadata: dict, history: list[dict]) -> Optional[dict]:
    """The training metrics of the checkpoint's epoch, if it was saved at the end of one."""
    if metadata.get("metrics"):
        return metadata["metrics"]
    return next((row for row in history if row.get("epoch") == metadata.get("epoch")), None)


def _headline(metadata: dict, result: EvaluationResult, history: list[dict]) -> list[str]:
    config = metadata.get("config", {})
    lines = [f"# {result.model}: test accuracy {result.test_accuracy:.2%}", ""]
    if is_synthetic(result.data_source):
        lines += ["> [!WARNING]", f"> Trained and evaluated on **synthetic data** ({result.data_source}): "
                  "these numbers are **not CIFAR-10** results. They only show that the pipeline runs.", ""]
    lines += [f"Checkpoint at step {result.step} (epoch {metadata.get('epoch', '?')} of {config.get('epochs', '?')}), "
              f"evaluated on **{result.num_examples:,} test images** from `{result.data_source}`.", ""]
    trained = _epoch_metrics(metadata, history) or {}
    cell = lambda key, fmt: format(trained[key], fmt) if key in trained else "–"
    lines += markdown_table(["", "train (that epoch)", "test"], [
        ["accuracy", cell("train_accuracy", ".4f"), f"{result.test_accuracy:.4f}"],
        ["loss", cell("train_loss", ".4f"), f"{result.test_loss:.4f}"],
    ])
    return lines + [""]


def _config_section(metadata: dict) -> list[str]:
    config = metadata.get("config", {})
    rows = [["parameters", f"{count_params(metadata['model']):,}"]]
    rows += [[name, f"`{value}`"] for name, value in config.items()]
    versions = ", ".join(f"{name} {version}" for name, version in (metadata.get("versions") or {}).items())
    lines = ["## Configuration", ""] + markdown_table(["setting", "value"], rows) + [""]
    return lines + ([f"Versions: {versions}.", ""] if versions else [])


def report_markdown(workdir: Path, metadata: dict, result: EvaluationResult, history: list[dict],
                    plot_paths: dict[str, Path]) -> str:
    per_class = [[c.name, f"{c.accuracy:.3f}", f"{c.precision:.3f}", f"{c.recall:.3f}", f"{c.support:,}"]
                 for c in result.per_class]
    lines = _headline(metadata, result, history)
    lines += ["## Training curves", ""] + _image(plot_paths, "training_curves", "accuracy and loss per epoch", workdir)
    lines += ["## Confusion matrix", "", "Rows are true classes, columns predictions; right: each row divided by its total.", ""]
    lines += markdown_table(["counts", "row-normalised"], [[
        _image_link(plot_paths, "confusion_matrix", "confusion matrix, counts", workdir),
        _image_link(plot_paths, "confusion_matrix_normalized", "confusion matrix, row-normalised", workdir),
    ]]) + [""]
    lines += ["## Per class", ""] + markdown_table(["class", "accuracy", "precision", "recall", "test images"], per_class) + [""]
    lines += ["## Most confused pairs", ""] + _image(plot_paths, "confused_pairs", "most confused class pairs", workdir)
    lines += ["## Random test images", "", "Predicted and true label; wrong predictions in red.", ""]
    lines += _image(plot_paths, "test_predictions", "random test images with predictions", workdir)
    if "image_predictions" in plot_paths:
        lines += ["## Your images", ""] + _image(plot_paths, "image_predictions", "your images with top classes", workdir)
    lines += _config_section(metadata)
    return "\n".join(lines)


# ---------------------------------------------------------------- the whole thing


def report_run(workdir: str | Path, step: str | int = "best", image_paths: Sequence[str | Path] = (),
               data_dir: Optional[str] = None, data: Optional[str] = None,
               num_devices: Optional[int] = None, decode_workers: Optional[int] = None) -> RunReport:
    """Evaluate a checkpoint, draw all plots into WORKDIR/plots/ and write WORKDIR/report.md."""
    workdir = Path(workdir).expanduser().absolute()
    restored = restore_run(workdir, step)
    metadata = restored.metadata
    dataset = dataset_for(metadata, data_dir, data)
    result = evaluate_restored(restored, dataset, num_devices)
    history = rundir.read_history(workdir, metadata.get("history") or [])
    photos = predict_photos(workdir, restored.step, image_paths, num_devices, decode_workers) if image_paths else None
    plot_paths = draw_plots(workdir / rundir.PLOTS_SUBDIR, history, result, dataset.test_images, metadata.get("epoch"), photos)
    report = workdir / rundir.REPORT_FILE
    rundir.write_text_atomically(report, report_markdown(workdir, metadata, result, history, plot_paths) + "\n")
    if wants_summaries(metadata):
        summaries.write_images(workdir, result.step, {name: plot_paths[name] for name in EVALUATION_IMAGES})
    return RunReport(report, plot_paths, result)


EVALUATION_IMAGES = ("confusion_matrix", "test_predictions")  # what `plot` and `evaluate` show in TensorBoard


def wants_summaries(metadata: dict) -> bool:
    return bool(metadata.get("config", {}).get("tensorboard", True))


def write_evaluation_images(workdir: str | Path, result: EvaluationResult, test_images_nhwc_uint8: np.ndarray,
                            metadata: dict) -> None:
    """The confusion matrix and the test images with predictions, as TensorBoard images of the run (`evaluate`)."""
    if not wants_summaries(metadata):
        return
    with tempfile.TemporaryDirectory() as scratch:
        pngs = {"confusion_matrix": plots.plot_confusion_matrix(result.confusion_matrix, result.class_names,
                                                                Path(scratch) / "confusion_matrix.png"),
                "test_predictions": plots.plot_prediction_grid(test_images_nhwc_uint8, result.labels,
                                                               result.predictions, result.class_names,
                                                               Path(scratch) / "test_predictions.png")}
        summaries.write_images(Path(workdir).expanduser(), result.step, pngs)
