"""The sampling chain a value head was fitted on, and the check that sampling uses that chain.

A value head learns h_t(x; y, c) = E[p(y | x0)^lambda | x_t] under one base chain: its guidance
scale, its number of steps, eta and scheduler fix which x_t occur and how each step moves. On
another chain the same steering no longer matches the tilted optimum's steps (a different CFG
scale changes the base chain itself), so a policy records its chain and a sampler that asks for
another is refused unless the caller says it wants that (``allow_other_chain``).
"""

from __future__ import annotations

from typing import Any

from ctrl_ray.errors import InputError

CHAIN_KEYS = ("guidance_scale", "num_inference_steps", "eta", "scheduler")


def fitted_chain(backbone, num_inference_steps: int, eta: float) -> dict[str, Any]:
    """The chain of `backbone` sampled with this many steps and this eta (what a head fits);
    every UNet backbone samples by the strided DDIM family of `ctrl_ray.sampling`."""
    return {"guidance_scale": float(getattr(backbone, "guidance_scale", 1.0)),
            "num_inference_steps": int(num_inference_steps), "eta": float(eta),
            "scheduler": "ddim"}


def check_chain(recorded: dict[str, Any] | None, requested: dict[str, Any], allow: bool,
                option: str, prefix: str = "") -> None:
    """Refuse sampling a value policy on a chain other than the one its head was fitted on
    (`requested` may name only some keys, `prefix` names where they come from, e.g.
    "evaluation."); `option` is how the caller allows it anyway."""
    if not recorded or allow:
        return
    changed = [f"{prefix}{key} {requested[key]!r} (fitted: {recorded[key]!r})"
               for key in CHAIN_KEYS
               if key in requested and key in recorded and requested[key] != recorded[key]]
    if changed:
        raise InputError(f"the value head was fitted on another chain: {', '.join(changed)}; "
                         f"its steering holds only there ({option} to sample anyway)")
