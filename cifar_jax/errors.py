"""The exception types users see (each message says what was wrong and what to do), and the one-line forms of
other libraries' errors quoted in them."""


class CifarJaxError(Exception):
    """A user-facing error (bad input, missing data, wrong config). The CLI prints it as one line."""


class DataError(CifarJaxError):
    """The dataset could not be found, read or trusted."""


class ConfigError(CifarJaxError):
    """A configuration value is invalid or conflicts with an existing run."""


class CheckpointError(CifarJaxError):
    """A checkpoint is missing, corrupt or belongs to another model."""


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written. Orbax's writer threads are left waiting on it: the process must exit at once."""


class RunFolderError(CifarJaxError):
    """A file of the run folder (metrics, plots, report) could not be written."""


class SweepError(CifarJaxError):
    """A comparison's study or its workers failed (storage errors, a worker that crashed)."""


class TrainingDivergedError(CifarJaxError):
    """Loss or gradients became NaN/Inf."""


class InputError(CifarJaxError):
    """An image, file or array given for prediction cannot be used."""


def one_line(error: BaseException) -> str:
    """A library's error message on one line (whitespace collapsed), or its type's name when it has none."""
    return " ".join(str(error).split()) or type(error).__name__


def first_line(error: BaseException) -> str:
    """The type and first line of an error whose message may run to a long trace (TensorStore, gRPC, decoders)."""
    lines = str(error).strip().splitlines()
    first = lines[0].split(" See full TensorStore details")[0] if lines else ""  # then a dump of its whole spec
    return f"{type(error).__name__}: {first}"[:300]
