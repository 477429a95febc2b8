"""Training: the generic run (``run``: processes, schedule, checkpoints, exact resume) and
masked-LM pretraining of an encoder (``mlm``, ``mlm_data``); ``plot`` draws a run's curves."""

from ctxvec.train.mlm import Trainer
from ctxvec.train.run import TrainConfig, TrainingRun, lock_run

__all__ = ["TrainConfig", "Trainer", "TrainingRun", "lock_run"]
