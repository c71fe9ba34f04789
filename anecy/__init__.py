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

# imported on first use: the engine loads SciPy's BLAS (a second), which `anecy --help` and a
# command refusing a bad flag or file should not wait for
_LAZY = {"Model": "model", "Trainer": "trainer", "StepRecord": "trainer",
         "TrainingDiverged": "trainer"}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


__all__ = ["ModelConfig", "Model", "TrainConfig", "Trainer", "StepRecord", "step_flops",
           "AnecyError", "BackendUnavailable", "CheckpointError", "ConfigError", "DataError",
           "TrainingDiverged", "__version__"]
