"""Training: hard-negative sampler, the loop, checkpoints/resume, torchrun/DDP setup."""

from ssageo.train.loop import NonFiniteLossError, lr_at, train
from ssageo.train.rundir import check_free_space, lock_run_dir, open_run_dir
from ssageo.train.sampler import HardNegativeSampler, plan_epoch, similarity_neighbours
from ssageo.train.state import TrainState, load_checkpoint, save_checkpoint, seed_everything
from ssageo.train.trainer import Trainer

__all__ = [
    "HardNegativeSampler",
    "NonFiniteLossError",
    "TrainState",
    "Trainer",
    "check_free_space",
    "load_checkpoint",
    "lock_run_dir",
    "lr_at",
    "open_run_dir",
    "plan_epoch",
    "save_checkpoint",
    "seed_everything",
    "similarity_neighbours",
    "train",
]
