"""Ray Jobs entrypoint for evaluation: `ctrl-ray evaluate` with the same arguments.

    ray job submit --working-dir . -- python jobs/evaluate.py \
        --model models:/ctrl-digits@champion --config configs/ctrl_digits_compress.yaml

Every argument goes to the CLI unchanged; a `models:/` URI resolves against the
MLFLOW_TRACKING_URI of the job's runtime_env (see jobs/README.md).
"""

import sys

from ctrl_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
