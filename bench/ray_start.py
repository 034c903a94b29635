"""`ray start` with patience: Ray 2.60 gives a new raylet 30 s (hard-coded in
ray/_private/node.py) to register with the GCS, which an overloaded shared machine (load
average 30-45 on 2 vCPUs) misses. This wrapper retries the registration check for up to
PATIENCE_S before handing over to the real `ray start`. Benchmark-only; fer-batch itself
never starts Ray this way.

    .venv/bin/python bench/ray_start.py --head --num-cpus=2 --temp-dir=...
"""

import sys
import time

import ray._private.services as services
from ray.scripts.scripts import main

PATIENCE_S = 300  # seconds a raylet may take to register

_get_node = services.get_node


def patient_get_node(*args, **kw):
    deadline = time.monotonic() + PATIENCE_S
    while True:
        try:
            return _get_node(*args, **kw)
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


services.get_node = patient_get_node

if __name__ == "__main__":
    sys.argv = ["ray", "start", *sys.argv[1:]]
    sys.exit(main())
