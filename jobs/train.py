"""`ray job submit ... -- python jobs/train.py DATA --output DIR` (attaches to the job's cluster)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir
from fer_batch.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
