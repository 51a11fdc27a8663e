"""The learning-rate schedule every update rule shares (`objective.lr_schedule`)."""

from __future__ import annotations

import pytest
import torch

from ctrl_ray.errors import InputError
from ctrl_ray.objectives.base import ObjectiveConfig, schedule_learning_rates


def _optimizer() -> torch.optim.AdamW:
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    return torch.optim.AdamW([{"params": [params[0]], "lr": 0.0, "name": "embedding"},
                              {"params": [params[1]], "lr": 0.0, "name": "adapter"}])


def test_cosine_anneals_both_rates_from_full_to_the_final_fraction():
    config = ObjectiveConfig(lr_embedding=0.03, lr_adapter=0.003, lr_schedule="cosine",
                             lr_final_fraction=0.1)
    optimizer = _optimizer()
    factors = [schedule_learning_rates(optimizer, config, step / 10) for step in range(11)]
    assert factors[0] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1)
    assert factors[5] == pytest.approx(0.55)
    assert all(a > b for a, b in zip(factors, factors[1:], strict=False))
    rates = {group["name"]: group["lr"] for group in optimizer.param_groups}
    assert rates == pytest.approx({"embedding": 0.003, "adapter": 0.0003})


def test_constant_keeps_the_configured_rates():
    config = ObjectiveConfig(lr_embedding=0.03, lr_adapter=0.003)
    optimizer = _optimizer()
    assert schedule_learning_rates(optimizer, config, 0.7) == 1.0
    assert [g["lr"] for g in optimizer.param_groups] == [0.03, 0.003]


@pytest.mark.parametrize("field, value", [("lr_schedule", "linear"),
                                          ("lr_final_fraction", 1.5)])
def test_a_bad_schedule_is_refused(field, value):
    with pytest.raises(InputError, match=field):
        ObjectiveConfig(**{field: value})
