"""anecy: train Llama-family transformers on one machine.

On Apple Silicon the matrix work is meant for the Apple Neural Engine; everywhere
else the same training loop runs on a portable CPU backend."""

__version__ = "0.1.0"

# The exports are imported on first use, so that the command line (anecy.cli, whose --help
# needs none of them) does not load the compiled core.
_EXPORTS = {
    "ModelConfig": "config", "TrainConfig": "config", "step_flops": "config",
    "AnecyError": "errors", "BackendUnavailable": "errors", "CheckpointError": "errors",
    "ConfigError": "errors", "DataError": "errors", "TrainingDiverged": "errors",
    "Model": "model",
    "StepRecord": "report",
    "Trainer": "trainer",
}

__all__ = ["ModelConfig", "Model", "TrainConfig", "Trainer", "StepRecord", "step_flops",
           "AnecyError", "BackendUnavailable", "CheckpointError", "ConfigError", "DataError",
           "TrainingDiverged", "__version__"]


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'anecy' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
