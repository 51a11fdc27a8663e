"""Ray Jobs entrypoint for base-model pre-training: `ctrl-ray pretrain` with the same arguments.

    ray job submit --working-dir . -- python jobs/pretrain.py \
        --config configs/pretrain_digits.yaml [--set KEY=VALUE ...]

Every argument goes to the CLI unchanged; MLflow logs (and registers the base model) in the
MLFLOW_TRACKING_URI of the job's runtime_env (see jobs/README.md).
"""

import sys

from ctrl_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
