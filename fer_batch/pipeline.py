"""The only module that chains stages onto Ray Data: list -> crop (CPU actors) ->
predict (GPU or CPU actors) -> Parquet (staging) -> commit.

    entries = sources.list_files(cfg.sources)             # driver: small dicts, no bytes
    split_long_videos(work_units(todo))                    # workers: long video -> segments
    ray.data.from_items(units)                             # one video, segment or <=32 images
      .map_batches(FaceCropper, CPU actor pool)            # read+decode+detect+crop, one task
      .map_batches(FacePredictor, GPU/CPU actor pool)      # batched ResNet-50
      .write_datasink(StagingSink)                         # Parquet into OUT/_staging/RID
    finish.deduplicate / fold_segments / track(RID)        # the staged rows become final
    runs.Output.commit(RID)                                # visible only now
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time

import numpy as np
import ray
from ray.data import ActorPoolStrategy

from fer_batch import finish, readers, runs, segments, sink, sources, storage
from fer_batch.attempts import AttemptCounter, AttemptLedger
from fer_batch.config import ANNOTATE_DEFAULTS, AnnotateConfig, ConfigError, DetectorSettings
from fer_batch.detect import readied_centerface
from fer_batch.infer import FacePredictor
from fer_batch.model import align_of, crop_margin_of, load_checkpoint
from fer_batch.preprocess import FaceCropper
from fer_batch.staging import StagingSink

IMAGES_PER_UNIT = ANNOTATE_DEFAULTS.images_per_task  # per-task overhead amortised over many
UNIT_BYTES = 64 * 2**20  # ... but no more than this many bytes of images in one task


def check_geometry(cfg: AnnotateConfig, meta: dict) -> None:
    """The model's crop geometry must be one these options can cut: a model whose faces are
    levelled by their eyes (align eyes) needs CenterFace's landmarks, which the croppers'
    CenterFace gives and the GPU detector pool does not (yet). Raises ConfigError."""
    if align_of(meta) != "eyes":
        return
    if cfg.detector != "centerface":
        raise ConfigError(f"{cfg.model} levels faces by their eyes (align eyes), which needs "
                          "CenterFace's landmarks: use --detector centerface")
    if cfg.detect_on == "pool":
        raise ConfigError(f"{cfg.model} levels faces by their eyes (align eyes); the GPU "
                          "detector pool gives no landmarks: use --detect-on cpu or auto")


def work_units(entries: list, images_per_unit: int = IMAGES_PER_UNIT) -> list[dict]:
    """Rows for Ray Data, one task each: a video alone (a slow video never holds others
    back), images in groups of up to images_per_unit files and UNIT_BYTES (10,000 small
    files would otherwise be 10,000 tasks: BENCHMARKS.md section 4). Each row is
    {"files": JSON list of file entries}; FaceCropper processes them one by one."""
    keys = ("uri", "media_type", "size_bytes", "mtime_ns")
    units, group, size = [], [], 0
    for e in entries:
        slim = {k: e[k] for k in keys}  # what a worker needs of the entry
        if e["media_type"] != "image":
            units.append([slim])
            continue
        if group and (len(group) >= max(1, images_per_unit)
                      or size + (e["size_bytes"] or 0) > UNIT_BYTES):
            units.append(group)
            group, size = [], 0
        group.append(slim)
        size += e["size_bytes"] or 0
    if group:
        units.append(group)
    return [{"files": json.dumps(u)} for u in units]


def resources() -> tuple[int, int]:
    res = ray.cluster_resources()
    return int(res.get("CPU", 1)), int(res.get("GPU", 0))


def run(cfg: AnnotateConfig, progress=print, meta: dict | None = None) -> dict:
    """Annotate cfg.sources into cfg.output; returns the run manifest (counts, paths, times).
    meta: the checkpoint's metadata when the caller has checked it (cli.check_annotate);
    else the checkpoint is loaded and checked here, before any work.

    Ray must be initialised by the caller (cli.main or a job)."""
    started, t0 = runs.now_iso(), time.perf_counter()
    if meta is None:
        cfg.check()
        _, meta = load_checkpoint(cfg.model, cfg.endpoint_url)
        sink.check_class_names(meta["classes"], cfg.model)
        check_geometry(cfg, meta)
    classes, model_id = meta["classes"], meta["model_id"]
    spec = dict(meta["input"], crop_margin=float(crop_margin_of(meta)),  # input and framing
                align=align_of(meta))

    out = runs.Output(cfg.output, cfg.endpoint_url)
    run_id = runs.new_run_id()
    out.acquire(run_id, break_lock=cfg.break_lock)  # refuses foreign folders
    try:
        for line in out.recover():
            progress(f"recovery: {line}")
        plan = plan_run(cfg, model_id, progress)
        progress(f"run {run_id}: {len(plan['entries'])} files listed, {len(plan['todo'])} to "
                 f"process, {len(plan['settled'])} skipped or unreadable, "
                 f"{len(plan['already'])} already done")
        stage = out.staging(run_id)
        out.write_json(f"{stage}/config.json", dict(config=dataclasses.asdict(cfg),
                                                    run_id=run_id, started=started))
        if plan["settled"]:
            sink.write_tables(out.fs, stage, sink.FILE_SCHEMA.empty_table(),
                              sink.file_rows_table(plan["settled"], model_id), name="listing")
        detected_on = _execute(cfg, plan["todo"], classes, spec, run_id) if plan["todo"] \
            else None
        t_proc = time.perf_counter() - t0
        # the end of the run (finish.py): its staged rows become final, then the commit
        dropped = finish.deduplicate(out, run_id)
        finish.fold_segments(out, run_id)
        n_tracks = finish.track(out, run_id, classes, min_score=cfg.min_score,
                                iou_threshold=cfg.track_iou_threshold,
                                max_gap_s=cfg.track_max_gap_s, smooth_s=cfg.track_smooth_s)
        other = len(plan["other_model"])
        manifest = dict(run_id=run_id, started=started, finished=runs.now_iso(),
                        seconds=round(time.perf_counter() - t0, 3),
                        processing_seconds=round(t_proc, 3), model=cfg.model,
                        model_id=model_id, classes=list(classes),
                        config=dataclasses.asdict(cfg), files_listed=len(plan["entries"]),
                        files_already_done=len(plan["already"]), duplicate_rows_dropped=dropped,
                        files_other_model=0 if cfg.relabel else other,
                        files_relabelled=other if cfg.relabel else 0,
                        detected_on=detected_on, tracks=n_tracks, **_count(out, run_id))
        out.commit_or_set_aside(run_id, manifest)
        manifest.update(faces_path=f"{out.uri}/faces", files_path=f"{out.uri}/files",
                        manifest_path=f"{out.uri}/_runs/{run_id}.json")
        return manifest
    finally:
        out.release()


def plan_run(cfg: AnnotateConfig, model_id: str, progress=print) -> dict:
    """What this run does, decided on the driver before any work: the listed file entries,
    those already done by a committed run (--incremental) and those of them another model
    labelled, those settled at listing (skipped, unreadable: their rows are written as
    they are) and those to process (``todo``)."""
    if sources.excluded(cfg.output, sources.exclusion_roots(cfg.sources)):
        progress(f"the output {cfg.output} lies inside a source: its files are not listed")
    entries = sources.list_files(cfg.sources, cfg.endpoint_url, exclude=(cfg.output,),
                                 follow_symlinks=cfg.follow_symlinks)
    if cfg.limit:
        entries = entries[:cfg.limit]
    bad_names = sum(not storage.utf8_name(e["uri"]) for e in entries)
    if bad_names:
        progress(f"{bad_names} file name(s) are not valid UTF-8: their rows name them with "
                 "\\xNN escapes for the bad bytes (docs/output.md)")
    files = readers.read_files(cfg.output, endpoint_url=cfg.endpoint_url) \
        if cfg.incremental else None
    already, other_model = incremental_split(
        entries, readers.done_index(cfg.output, files=files) if files is not None else {},
        readers.labelled_by(files) if files is not None else {}, model_id, cfg.relabel)
    if other_model:
        progress(f"{len(other_model)} done file(s) were labelled by another model than "
                 f"{model_id}: " + ("relabelled now (--relabel)" if cfg.relabel else
                                     "kept; --relabel redoes them with this model"))
    skip = {e["uri"] for e in already}
    return dict(entries=entries, already=already, other_model=other_model,
                settled=[e for e in entries if e["status"] != "pending" and e["uri"] not in skip],
                todo=[e for e in entries if e["status"] == "pending" and e["uri"] not in skip])


def incremental_split(entries: list, done: dict, labelled_by: dict, model_id: str,
                      relabel: bool = False) -> tuple[list, list]:
    """(already, other_model) for --incremental: the entries an earlier committed run did
    (same uri, size and mtime; done: readers.done_index), and those of them whose latest ok
    row another model labelled (labelled_by: readers.labelled_by). With relabel, files of
    another model are not 'already done': they are processed again."""
    already = [e for e in entries
               if done.get(sink.safe_text(e["uri"])) == (e["size_bytes"], e["mtime_ns"])]
    other = [e for e in already
             if labelled_by.get(sink.safe_text(e["uri"]), model_id) != model_id]
    if relabel:
        redo = {e["uri"] for e in other}
        already = [e for e in already if e["uri"] not in redo]
    return already, other


def detect_in_pool(cfg: AnnotateConfig, use_gpu: bool) -> bool:
    """--detect-on: pool, or auto on GPUs with centerface (and onnx2torch installed)."""
    from fer_batch.detect_torch import torch_detector_installed
    if cfg.detect_on == "auto":
        return use_gpu and cfg.detector == "centerface" and torch_detector_installed()
    return cfg.detect_on == "pool"


def start_detector_pool(cfg: AnnotateConfig, use_gpu: bool, n_gpu: int):
    """One CenterFace actor per GPU, each on half of it (the classifier takes the other
    half), or one on the CPU sharing the croppers' cores, like the classifier there.
    Returns the croppers' side of it, a detect_torch.PoolDetector."""
    from fer_batch.detect_torch import CenterFaceBatch, PoolDetector
    # a detector that dies (a GPU fault, out of GPU memory) is restarted and the call retried
    # (it has no state); a call that still fails becomes that file's error row
    actor = ray.remote(CenterFaceBatch).options(num_cpus=0, num_gpus=0.5 if use_gpu else 0,
                                                max_restarts=3, max_task_retries=1)
    actors = [actor.remote(threshold=cfg.centerface_threshold,
                           device="cuda" if use_gpu else "cpu", threads=0 if use_gpu else 1)
              for _ in range(max(1, n_gpu) if use_gpu else 1)]
    return PoolDetector(actors, DetectorSettings.of(cfg))


def _execute(cfg: AnnotateConfig, todo: list, classes, spec: dict, run_id: str) -> str:
    """Run the Ray Data chain over the files to do; returns where faces were detected
    ("croppers", or "pool (cuda)" / "pool (cpu)"), for the manifest."""
    n_cpu, n_gpu = resources()
    use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and n_gpu > 0)
    crop_actors = cfg.preprocess_actors or max(1, n_cpu)
    infer_actors = cfg.infer_actors or (max(1, n_gpu) if use_gpu else 1)
    pool = start_detector_pool(cfg, use_gpu, n_gpu) \
        if detect_in_pool(cfg, use_gpu) and spec["align"] != "eyes" else None
    ledger = AttemptLedger.remote()
    units = work_units(todo, cfg.images_per_task)
    every_n = 1 if cfg.all_frames else cfg.every_n_frames
    if cfg.segment_seconds > 0:
        units = split_long_videos(cfg, units, every_n, ledger)
    ds = (
        ray.data.from_items(units, override_num_blocks=len(units))  # one unit per task
        .map_batches(
            FaceCropper, batch_size=1, batch_format="numpy", num_cpus=1,
            # start as many actors as the CPUs present now (not 1, then scale up: each actor
            # start costs seconds of imports); grow to crop_actors as nodes join
            compute=ActorPoolStrategy(min_size=min(crop_actors, max(1, n_cpu), len(units)),
                                      max_size=min(crop_actors, len(units)),
                                      # a unit is seconds to minutes of work: queued behind a
                                      # busy actor it would wait while another actor idles
                                      # (two segments of one video on one actor)
                                      max_tasks_in_flight_per_actor=1),
            fn_constructor_kwargs=dict(
                face_size=spec["size"], channels=tuple(spec["channels"]),
                crop_margin=spec["crop_margin"], align=spec["align"],
                detection=DetectorSettings.of(cfg), sample_fps=cfg.sample_fps,
                every_n_frames=every_n, decode_threads=cfg.decode_threads, pool=pool,
                max_pixels=cfg.max_pixels, endpoint_url=cfg.endpoint_url,
                max_image_bytes=cfg.max_image_bytes,
                attempts=AttemptCounter(ledger, cfg.stall_timeout_s),
                max_attempts=cfg.max_file_retries + 1,
                # readied once here: each cropper would import onnx (~1 CPU s) to do it
                detector_model=readied_centerface()
                if pool is None and cfg.detector == "centerface" else None))
        .map_batches(
            FacePredictor, batch_size=cfg.batch_size, batch_format="numpy",
            # on CPU the predictor shares cores with the croppers: inference is ~5% of the work
            # with the detector pool, each GPU's other half
            num_gpus=(0.5 if pool else 1) if use_gpu else 0, num_cpus=1 if use_gpu else 0,
            compute=ActorPoolStrategy(size=infer_actors),
            fn_constructor_kwargs=dict(
                checkpoint=cfg.model, device="cuda" if use_gpu else "cpu",
                batch_size=cfg.batch_size, min_score=cfg.min_score,
                flip_average=cfg.flip_average,
                endpoint_url=cfg.endpoint_url, num_threads=0 if use_gpu else 1))
    )
    with show_progress(ledger, len(todo)):
        ds.write_datasink(StagingSink(cfg.output, run_id, classes, cfg.endpoint_url))
    if pool is None:
        return "croppers"
    return f"pool ({'cuda' if use_gpu else 'cpu'})"


def split_long_videos(cfg: AnnotateConfig, units: list, every_n: int, ledger) -> list[dict]:
    """Work units with each video longer than cfg.segment_seconds replaced by one unit per
    segment (segments.split_unit). The videos are opened on the workers (the driver opens no
    file), in Ray tasks before the annotate chain: a block of the chain goes to one actor
    whole, so segments must be units of their own from the start. When this fails, videos
    stay whole (one task each), as with --segment-seconds 0."""
    videos = [u for u in units if segments.video_uri(u) is not None]
    if not videos:
        return units
    kw = dict(segment_s=cfg.segment_seconds, sample_fps=cfg.sample_fps, every_n=every_n,
              max_pixels=cfg.max_pixels, endpoint_url=cfg.endpoint_url,
              attempts=AttemptCounter(ledger), max_attempts=cfg.max_file_retries + 1)
    chunks = np.array_split(np.arange(len(videos)), min(len(videos), 4 * resources()[0]))
    try:
        split = ray.get([_split_units.remote([videos[i] for i in c], kw) for c in chunks])
    except Exception as e:  # noqa: BLE001 - splitting is an optimisation, never a failure
        import logging
        logging.getLogger(__name__).warning("long videos not split into segments: %s", e)
        return units
    by_uri: dict[str, list] = {}
    for row in (r for rows in split for r in rows):
        by_uri.setdefault(segments.video_uri(row), []).append(row)
    out = []
    for unit in units:
        rows = by_uri.get(segments.video_uri(unit))
        out += sorted(rows, key=segments.unit_order) if rows else [unit]
    return out


# a worker lost mid-probe: again (the ledger bounds the tries). The function lives in
# segments.py, so its workers import that light module, not this one (torch, Ray Data).
_split_units = ray.remote(max_retries=-1)(segments.split_units)


@contextlib.contextmanager
def show_progress(ledger, total: int, interval_s: float = 1.0):
    """While the body runs, a thread shows files done of total, frames and faces found (from
    the ledger the croppers report to) as a progress bar with ETA."""
    from fer_batch.console import progress_bar
    done = threading.Event()

    def loop():
        bar = progress_bar(total, "annotate", "file")
        while not done.wait(interval_s):
            try:
                files, frames, faces = ray.get(ledger.progress.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - a slow or lost ledger must not stop the run
                continue
            bar.update(min(files, total) - bar.n)
            bar.set_postfix_str(f"frames {frames}, faces {faces}")
        bar.close()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=15)


def _count(out: runs.Output, run_id: str) -> dict:
    import pyarrow.dataset as pds
    d = f"{out.staging(run_id)}/files"
    if not out.exists(d):
        return dict(files_ok=0, files_error=0, files_skipped=0, frames=0, faces=0)
    t = pds.dataset(d, filesystem=out.fs, format="parquet").to_table(
        columns=["status", "frames_decoded", "faces"])
    status = t["status"].to_pylist()
    return dict(files_ok=status.count("ok"), files_error=status.count("error"),
                files_skipped=status.count("skipped"),
                frames=int(sum(t["frames_decoded"].to_pylist())),
                faces=int(sum(t["faces"].to_pylist())))
