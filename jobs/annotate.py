"""`ray job submit ... -- python jobs/annotate.py SOURCE... --model CKPT --output OUT`.

Inside a Ray job RAY_ADDRESS is set, so cli.init_ray attaches to that cluster
(`ray.init()` with no address) and never starts a second Ray.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir
from fer_batch.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["annotate", *sys.argv[1:]]))
