"""Ray Jobs entrypoint for CTRL fine-tuning: `ctrl-ray finetune` with the same arguments.

    ray job submit --working-dir . -- python jobs/finetune.py \
        --config configs/ctrl_digits_compress.yaml [--set KEY=VALUE ...] \
        [--workers N] [--mode adjoint|pathwise|ppo] [--resume | --resume-if-present]

Every argument goes to the CLI unchanged, so the job and `ctrl-ray finetune` cannot drift.
Ray Jobs sets RAY_ADDRESS, so `ray.init()` joins the cluster the job runs on; MLflow logs to
the MLFLOW_TRACKING_URI of the job's runtime_env (see jobs/README.md).
"""

import sys

from ctrl_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
