"""Reverse diffusion with trajectory recording and per-step KL (see ``sampler``)."""

from ctrl_ray.sampling.sampler import (
    DenoisingSchedule,
    RolloutInputs,
    Trajectory,
    Truncation,
    gaussian_kl,
    gaussian_log_prob,
    sample,
    step_mean,
)

__all__ = [
    "DenoisingSchedule",
    "RolloutInputs",
    "Trajectory",
    "Truncation",
    "gaussian_kl",
    "gaussian_log_prob",
    "sample",
    "step_mean",
]
