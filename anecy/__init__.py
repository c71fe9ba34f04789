"""anecy: train Llama-family transformers on one machine.

On Apple Silicon the matrix work is meant for the Apple Neural Engine; everywhere
else the same training loop runs on a portable CPU backend."""

__version__ = "0.1.0"

from .config import (  # noqa: E402
                     ModelConfig,
                     TrainConfig,  # noqa: E402
                     step_flops,
)
from .errors import AnecyError, BackendUnavailable, CheckpointError, ConfigError, DataError  # noqa: E402
from .model import Model  # noqa: E402
from .trainer import StepRecord, Trainer, TrainingDiverged  # noqa: E402

__all__ = ["ModelConfig", "Model", "TrainConfig", "Trainer", "StepRecord", "step_flops",
           "AnecyError", "BackendUnavailable", "CheckpointError", "ConfigError", "DataError",
           "TrainingDiverged", "__version__"]
