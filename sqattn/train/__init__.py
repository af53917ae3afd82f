"""The generic trainer: ``train_and_evaluate(config, workdir)`` over any registered Task."""

from sqattn.train.trainer import NonFiniteLossError, train_and_evaluate, train_or_load

__all__ = ["NonFiniteLossError", "train_and_evaluate", "train_or_load"]
