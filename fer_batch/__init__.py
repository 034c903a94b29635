"""fer-batch: facial expression labels for every face in large image and video archives."""

__all__ = ["read_faces", "read_files", "read_tracks"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """The readers, imported on first use: every Ray worker imports this package, and most
    of them never read an output (pandas and pyarrow.dataset cost each ~0.5 CPU s)."""
    if name in __all__:
        from fer_batch import readers
        return getattr(readers, name)
    raise AttributeError(f"module 'fer_batch' has no attribute {name!r}")
