"""Ray Jobs entrypoint for the KL-weight sweep: `ctrl-ray tune` with the same arguments.

    ray job submit --working-dir . -- python jobs/tune.py --config configs/tune_kl.yaml
"""

import sys

from ctrl_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
