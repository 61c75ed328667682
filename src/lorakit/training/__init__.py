"""Supervised fine-tuning: data, the training loop, checkpoints, schedules, memory, data parallelism.

The package is `lorakit.training`; the function users call is `lorakit.train(...)`.
"""
from .run import train, train_model
from .trainer import NonFiniteLoss, TrainConfig, Trainer

__all__ = ["train", "train_model", "TrainConfig", "Trainer", "NonFiniteLoss"]
