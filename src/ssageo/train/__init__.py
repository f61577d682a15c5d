"""Training: hard-negative sampler, the loop, checkpoints/resume, torchrun/DDP setup."""

from ssageo.train.loop import NonFiniteLossError, check_run_dir, lr_at, train
from ssageo.train.sampler import HardNegativeSampler, plan_epoch, similarity_neighbours
from ssageo.train.state import load_checkpoint, save_checkpoint, seed_everything

__all__ = [
    "HardNegativeSampler",
    "NonFiniteLossError",
    "check_run_dir",
    "load_checkpoint",
    "lr_at",
    "plan_epoch",
    "save_checkpoint",
    "seed_everything",
    "similarity_neighbours",
    "train",
]
