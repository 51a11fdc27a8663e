"""The MLflow pyfunc model of ctrl-ray (logged as code, so nothing is unpickled on load).

Artifacts: `base_model` (a base-model directory, e.g. a Stable-Diffusion-format pipeline) and,
for a fine-tuned model, `adapter` (a CTRL checkpoint directory, which records the backbone's
kind, prompts and guidance scale). `predict` takes a DataFrame with columns `c` (context: a
class id, or a prompt string or prompt index for a text-to-image model) or `prompt` (any text,
for a text-to-image model), `seed`
and, for a fine-tuned model, one column per label (`y` works for a single label; a class
index or class name; -1 or a missing column means unconditional) and returns one image per
row, deterministic per seed. `ctrl_ray.registry` logs it with that signature and a one-row
input example.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import torch


class CtrlDiffusionModel(mlflow.pyfunc.PythonModel):
    """Samples images from a base or CTRL-fine-tuned diffusion model."""

    def load_context(self, context) -> None:
        from ctrl_ray.policy import load_from_artifacts

        self.policy = load_from_artifacts(context.artifacts)
        self.policy.model.eval()

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        from ctrl_ray.evaluation import generate
        from ctrl_ray.policy import class_index, context_indices

        frame = pd.DataFrame(model_input)
        if "prompt" in frame.columns:   # a text model's free text; `c` fills rows without one
            given = frame["c"].tolist() if "c" in frame.columns else [None] * len(frame)
            values = [c if not isinstance(p, str) else p
                      for p, c in zip(frame["prompt"].tolist(), given, strict=True)]
        elif "c" in frame.columns:
            values = frame["c"].tolist()
        else:
            raise ValueError(f"model input needs a column 'c' (or 'prompt' for a text model), "
                             f"got columns {list(frame.columns)}")
        if any(value is None or (isinstance(value, float) and np.isnan(value))
               for value in values):
            raise ValueError("every row needs a context: a prompt or a value in column 'c'")
        contexts = context_indices(self.policy.model, values)
        seeds = frame["seed"].tolist() if "seed" in frame.columns else [0] * len(frame)
        labels = {}
        for name, num_classes in self.policy.model.label_classes.items():
            column = name if name in frame.columns else "y"
            info = self.policy.label_info.get(name, {})  # y may be a class name
            values = np.asarray([class_index(value, name, num_classes, info)
                                 for value in frame[column]] if column in frame.columns
                                else -np.ones(len(frame)), dtype=np.int64)
            values = np.where(values < 0, num_classes, values)
            labels[name] = torch.tensor(values, dtype=torch.long)
        images, _ = generate(self.policy.model, contexts, labels, seeds,
                             from_reference=not self.policy.fine_tuned, **self.policy.sampling)
        return images.numpy()


mlflow.models.set_model(CtrlDiffusionModel())
