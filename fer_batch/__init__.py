"""fer-batch: facial expression labels for every face in large image and video archives."""

from fer_batch.runs import read_faces, read_files

__all__ = ["read_faces", "read_files"]
__version__ = "0.1.0"
