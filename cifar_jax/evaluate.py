"""Evaluate a checkpoint on every test image: loss, accuracy, per-class precision/recall, confusion matrix.

The counting is plain numpy on host predictions; the logits come from `steps.BatchedInference`, the same padded,
any-device-count pass the training loop and `Predictor` use, so `evaluate` and the run's own test metrics agree.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from cifar_jax import checkpoint, parallel
from cifar_jax.data import Cifar10, check_dataset, load_cifar10
from cifar_jax.models import abstract_model, abstract_params
from cifar_jax.steps import BatchedInference, loss_and_accuracy


@dataclasses.dataclass(frozen=True)
class ClassMetrics:
    """How one class fares; `accuracy` is the share of its own images classified right (the same as recall)."""

    name: str
    accuracy: float
    precision: float  # of the images predicted as this class, the share that really are
    recall: float
    support: int  # test images of this class


@dataclasses.dataclass
class EvaluationResult:
    model: str
    step: int
    data_source: str
    class_names: tuple[str, ...]
    test_loss: float
    test_accuracy: float
    per_class: list[ClassMetrics]
    confusion_matrix: np.ndarray  # (classes, classes) counts; rows are true classes, columns predictions
    labels: np.ndarray  # (num_test,) true class ids, in test-set order
    predictions: np.ndarray  # (num_test,) predicted class ids

    @property
    def num_examples(self) -> int:
        return int(len(self.labels))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: metrics only, no per-image arrays."""
        return {
            "model": self.model,
            "step": self.step,
            "data_source": self.data_source,
            "num_examples": self.num_examples,
            "test_loss": self.test_loss,
            "test_accuracy": self.test_accuracy,
            "per_class": {c.name: {"accuracy": c.accuracy, "precision": c.precision, "recall": c.recall,
                                   "support": c.support} for c in self.per_class},
            "confusion_matrix": self.confusion_matrix.tolist(),
        }


# ---------------------------------------------------------------- counting (pure numpy)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts: entry [t, p] is how many images of class t were predicted p."""
    flat_index = np.asarray(labels, np.int64) * num_classes + np.asarray(predictions, np.int64)
    return np.bincount(flat_index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _share(part: np.ndarray, whole: np.ndarray) -> np.ndarray:
    """part / whole, 0 where whole is 0 (a class never seen or never predicted has no precision to speak of)."""
    return np.divide(part, whole, out=np.zeros(part.shape, np.float64), where=whole > 0)


def per_class_metrics(confusion: np.ndarray, class_names: tuple[str, ...] | list[str]) -> list[ClassMetrics]:
    correct = np.diag(confusion)
    support = confusion.sum(axis=1)
    recall = _share(correct, support)
    precision = _share(correct, confusion.sum(axis=0))
    return [ClassMetrics(str(name), float(r), float(p), float(r), int(s))
            for name, r, p, s in zip(class_names, recall, precision, support)]


def most_confused_pairs(confusion: np.ndarray, top: int = 3) -> list[tuple[int, int, int]]:
    """The `top` class pairs mixed up most, both directions counted: (class a, class b, mistakes), most first."""
    both_ways = np.triu(confusion + confusion.T, k=1)
    order = np.argsort(both_ways, axis=None, kind="stable")[::-1][:top]
    pairs = [(int(a), int(b), int(both_ways[a, b])) for a, b in zip(*np.unravel_index(order, both_ways.shape))]
    return [pair for pair in pairs if pair[2] > 0]


# ---------------------------------------------------------------- the model pass


def eval_batch_size(requested: int, num_examples: int, num_devices: int) -> int:
    """A global batch that splits evenly over the devices and is no larger than the test set needs."""
    per_device = math.ceil(min(requested, max(num_examples, 1)) / num_devices)
    return per_device * num_devices


def model_logits(model_name: str, params: Any, standardize: bool, images_nhwc_uint8: np.ndarray,
                 num_devices: Optional[int] = None, requested_batch: Optional[int] = None,
                 tta_flip: bool = False) -> np.ndarray:
    """Logits of every image, in order, computed on `num_devices` devices (all when None); with `tta_flip`,
    averaged with the mirror images' logits. `requested_batch` unset: the backend's evaluation batch."""
    devices = parallel.DeviceSet.select(num_devices)
    graphdef, _ = abstract_model(model_name)
    requested = devices.defaults.eval_batch_size if requested_batch is None else requested_batch
    batch = eval_batch_size(requested, len(images_nhwc_uint8), devices.global_count)
    inference = BatchedInference(graphdef, standardize, devices, batch, tta_flip)
    return inference(devices.replicate(params), images_nhwc_uint8)


def summarize(logits: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...], model: str, step: int,
              data_source: str) -> EvaluationResult:
    labels = np.asarray(labels)
    test_loss, test_accuracy = loss_and_accuracy(logits, labels)
    predictions = logits.argmax(-1)
    confusion = confusion_matrix(labels, predictions, len(class_names))
    return EvaluationResult(model, step, data_source, tuple(class_names), test_loss, test_accuracy,
                            per_class_metrics(confusion, class_names), confusion, labels, predictions)


# ---------------------------------------------------------------- checkpoint + data → result


def restore_run(workdir: str | Path, step: str | int = "best") -> checkpoint.Restored:
    return checkpoint.restore_for_inference(workdir, step, abstract_params)


def dataset_for(metadata: dict, data_dir: Optional[str] = None, source: Optional[str] = None) -> Cifar10:
    """The dataset the checkpoint was trained on, unless `data_dir` / `source` say otherwise."""
    config = metadata.get("config", {})
    return load_cifar10(data_dir or config.get("data_dir"), source or config.get("data", "auto"))


def evaluate_restored(restored: checkpoint.Restored, dataset: Cifar10, num_devices: Optional[int] = None) -> EvaluationResult:
    meta = restored.metadata
    config = meta.get("config", {})
    requested_batch = config.get("eval_batch_size")  # unset or absent: the backend's
    # The same test-time view the run's own test metrics used (flip TTA when it was configured).
    logits = model_logits(meta["model"], restored.params, meta["normalization"]["standardize"], dataset.test_images,
                         num_devices, requested_batch, bool(config.get("tta_flip")))
    class_names = tuple(meta.get("class_names") or dataset.class_names)
    return summarize(logits, dataset.test_labels, class_names, meta["model"], restored.step, dataset.source)


def evaluate(workdir: str | Path, step: str | int = "best", dataset: Optional[Cifar10] = None,
             num_devices: Optional[int] = None, data_dir: Optional[str] = None,
             data: Optional[str] = None) -> EvaluationResult:
    """Evaluate one checkpoint of a run on all its test images (the run's own dataset unless one is given)."""
    restored = restore_run(workdir, step)
    dataset = check_dataset(dataset) if dataset is not None else dataset_for(restored.metadata, data_dir, data)
    return evaluate_restored(restored, dataset, num_devices)


# ---------------------------------------------------------------- human-readable output


def format_result(result: EvaluationResult) -> str:
    """A plain-text report: headline metrics, a per-class table and the confusion matrix."""
    width = max(len(name) for name in result.class_names)
    lines = [
        f"{result.model}, checkpoint step {result.step}, on {result.num_examples:,} test images ({result.data_source})",
        f"test loss {result.test_loss:.4f}   test accuracy {result.test_accuracy:.4f}",
        "",
        f"{'class':<{width}}  accuracy  precision  recall  support",
    ]
    lines += [f"{c.name:<{width}}  {c.accuracy:8.4f}  {c.precision:9.4f}  {c.recall:6.4f}  {c.support:7d}"
              for c in result.per_class]
    cell = max(6, len(str(int(result.confusion_matrix.max()))) + 1)
    lines += ["", "confusion matrix (rows: true class, columns: predicted class)",
              " " * width + "".join(f"{name[:cell - 1]:>{cell}}" for name in result.class_names)]
    lines += [f"{name:<{width}}" + "".join(f"{count:>{cell}d}" for count in row)
              for name, row in zip(result.class_names, result.confusion_matrix)]
    return "\n".join(lines)
