"""fer-batch: facial expression labels for every face in large image and video archives."""

from fer_batch.readers import read_faces, read_files, read_tracks

__all__ = ["read_faces", "read_files", "read_tracks"]
__version__ = "0.1.0"
