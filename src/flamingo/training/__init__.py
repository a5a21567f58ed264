"""Training the Flamingo bridge (paper section 2.4, appendix B.1.2): config, data protocol,
optimiser and schedule, the trainer (DDP/FSDP, bf16, gradient checkpointing), atomic
checkpoints with exact resume, metrics and plots.

    from flamingo.training import load_train_config, train
    result = train(load_train_config("configs/train/tiny-cpu.yaml", ["steps=100"]))
"""

from flamingo.training.config import (
    CheckpointConfig,
    DatasetSpec,
    DistributedConfig,
    LoggingConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    load_train_config,
)
from flamingo.training.data import BatchSource, build_sources
from flamingo.training.trainer import StepResult, Trainer, TrainingError, TrainResult, train

__all__ = [
    "BatchSource",
    "CheckpointConfig",
    "DatasetSpec",
    "DistributedConfig",
    "LoggingConfig",
    "OptimConfig",
    "ScheduleConfig",
    "StepResult",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingError",
    "build_sources",
    "load_train_config",
    "train",
]
