"""The annotate chain's last stage on Ray Data: the row stream into Parquet in the run's
staging folder (OUT/_staging/RID), invisible to readers until the commit (runs.py).

A module of its own, apart from pipeline.py: Ray Data's write tasks import the sink's
module, and this one imports no torch (a write worker starts in ~2 CPU s instead of ~6;
BENCHMARKS.md, "Per-run fixed overhead").
"""

from __future__ import annotations

import os

from ray.data.block import BlockAccessor
from ray.data.datasource import Datasink

from fer_batch import runs, sink


class StagingSink(Datasink):
    """Ray Data sink: splits each block into faces and files tables, writes both as Parquet
    into the run's staging folder. Nothing here is visible to readers until commit."""

    def __init__(self, output: str, run_id: str, classes, endpoint_url=None):
        self.output, self.run_id, self.classes = output, run_id, list(classes)
        self.endpoint_url = endpoint_url

    def write(self, blocks, ctx):
        out = runs.Output(self.output, self.endpoint_url)
        stage = out.staging(self.run_id)
        rows = 0
        for i, block in enumerate(blocks):
            batch = BlockAccessor.for_block(block).to_batch_format("numpy")
            faces, files = sink.split_batch(batch, self.classes)
            segs = sink.segment_table(batch)  # partial rows of long videos' segments
            sink.write_tables(out.fs, stage, faces, files, name=f"{ctx.task_idx:06d}-{i:04d}-"
                              f"{os.urandom(3).hex()}", segments=segs)
            rows += faces.num_rows + files.num_rows + segs.num_rows
        return rows
