"""The one exception type users see: its message says what was wrong and what to do."""


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


class TrainingDivergedError(CifarJaxError):
    """Loss or gradients became NaN/Inf."""


class InputError(CifarJaxError):
    """An image, file or array given for prediction cannot be used."""
