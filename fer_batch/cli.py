"""get_parser(), main(argv=None): the `fer-batch` command (also `python -m fer_batch`).

Every flag is built from a field of AnnotateConfig or TrainConfig, so `--sample-fps`
is always `sample_fps` and its help is the field's documentation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import time

from fer_batch.config import ALIGNS, DETECTORS, AnnotateConfig, ConfigError, TrainConfig

EXIT_USAGE = 2  # bad arguments, missing model, unreadable source
EXIT_FAILED = 1  # the run itself failed
EXIT_INTERRUPTED = 130  # SIGINT/SIGTERM: the run left nothing visible

DESCRIPTION = """\
Find faces in image and video archives and label each face with a facial expression
(ResNet-50 on 48x48 face crops, after the paper's method; faces found by CenterFace, or by
the paper's Haar cascade with --detector haar), on Ray: locally in-process, or
on a cluster. Without --model, the shipped model labels faces (FER2013, 7 expressions with
neutral; MODEL.md).

  fer-batch annotate SOURCE... --output OUT   label every face -> OUT/faces, OUT/files
  fer-batch report OUT                        HTML page of a run's results
  fer-batch evaluate DATA [--model CKPT]      metrics on a labeled folder
  fer-batch train DATA... --pretrained default --output DIR   fine-tune -> DIR/model.pt
"""


def _add_config_flags(parser: argparse.ArgumentParser, cls) -> None:
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        md = f.metadata
        group = groups.setdefault(md.get("group", "general"),
                                  parser.add_argument_group(md.get("group", "general")))
        default = f.default
        help_text = md.get("help", "")
        if md.get("positional"):
            nargs = ("*" if default else "+") if isinstance(default, tuple) else "?"
            group.add_argument(f.name, nargs=nargs, default=default,
                               metavar=md.get("metavar", f.name.upper()),
                               help=f"{help_text} (default: {default})" if default != () else
                               help_text)
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=default, help=help_text)
            continue
        kind = type(default) if default is not None else str
        kw = dict(dest=f.name, default=default, type=kind,
                  help=f"{help_text} (default: {default})")
        if md.get("choices"):
            kw["choices"] = md["choices"]
        if md.get("required"):
            kw.update(required=True, help=help_text + " (required)")
            kw.pop("default")
        group.add_argument(flag, **kw)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fer-batch", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", help="also show Ray's own log "
                        "messages and workers' output on the console (they always go to "
                        "Ray's log files, /tmp/ray/session_latest/logs)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help, **kw)

    p = command("annotate", "label every face in images and videos -> Parquet",
                description="Annotate images and videos: one Parquet row per face in "
                "OUT/faces, one row per input file in OUT/files (see README).")
    _add_config_flags(p, AnnotateConfig)
    p = command("train", "train or fine-tune ResNet-50 on labeled folders (Ray Train)",
                description="Train on folders with one subfolder per class; writes "
                "model.pt, metrics.json and plots to --output.")
    _add_config_flags(p, TrainConfig)
    p = command("evaluate", "metrics and confusion matrix of a model on a labeled folder")
    p.add_argument("data", help="labeled folder (one subfolder per class)")
    p.add_argument("--model", default="default", help="checkpoint (model.pt, local or "
                   "s3://; default: the model shipped with fer-batch, see MODEL.md)")
    p.add_argument("--output", default="fer-eval", help="folder for metrics.json and plots")
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint for S3-compatible stores")
    p.add_argument("--detect-faces", action=argparse.BooleanOptionalAction, default=False,
                   help="crop the largest face of each image first (for full photos "
                   "such as JAFFE; off for ready-made crops such as CK+48)")
    p.add_argument("--crop-margin", type=float, default=None, help="margin around the Haar "
                   "box with --detect-faces, as a fraction of its side (default: the "
                   "checkpoint's, as annotate uses)")
    p.add_argument("--detector", choices=DETECTORS,
                   default=AnnotateConfig.detector, help="face detector of --detect-faces "
                   "(default: annotate's)")
    p.add_argument("--align", choices=ALIGNS, default=None, help="level each face by its "
                   "eyes (eyes) or cut it as found (none) with --detect-faces (default: the "
                   "checkpoint's, as annotate uses)")
    p.add_argument("--flip-average", action=argparse.BooleanOptionalAction,
                   default=AnnotateConfig.flip_average, help="average each face's "
                   "probabilities with its mirror image's, as annotate does")
    p = command("report", "self-contained HTML report of an output folder")
    p.add_argument("output", help="the OUT folder of `fer-batch annotate`")
    p.add_argument("--html", default=None, help="where to write the page "
                   "(default: OUT/report/index.html)")
    p = command("compact", "merge the committed runs of an output folder into one")
    p.add_argument("output", help="the OUT folder of `fer-batch annotate`")
    return parser


def command_line(command: str, cfg, rel=lambda p: p) -> str:
    """The `fer-batch COMMAND ...` line that gives cfg: positionals, then the flags whose
    values differ from the defaults (the inverse of _add_config_flags). rel maps paths."""
    default, parts = type(cfg)(), [f"fer-batch {command}"]
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.metadata.get("positional"):
            parts += [rel(x) for x in (v if isinstance(v, tuple) else (v,))]
        elif v != getattr(default, f.name):
            flag = "--" + f.name.replace("_", "-")
            if isinstance(v, bool):
                parts.append(flag if v else "--no-" + flag[2:])
            else:
                parts.append(f"{flag} {rel(v) if isinstance(v, str) else v}")
    return " ".join(parts)


def config_from_args(cls, args: argparse.Namespace):
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    for name in ("sources", "data"):
        if isinstance(kw.get(name), list):
            kw[name] = tuple(kw[name])
    return cls(**kw)


def init_ray(address: str | None, verbose: bool = False) -> None:
    """Join the cluster of a `ray job submit` job (RAY_ADDRESS) or --address; else start an
    in-process local Ray. Library code never calls ray.init. Workers' output and Ray's
    internal messages go to Ray's log files, and to the console only with --verbose."""
    import ray

    from fer_batch.console import quiet_ray
    if ray.is_initialized():
        return
    if not verbose:
        from fer_batch.console import divert_native_stderr
        divert_native_stderr()  # Ray's C++ core writes to file descriptor 2 directly
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, log_to_driver=verbose)
    else:
        ray.init(include_dashboard=False, log_to_driver=verbose, configure_logging=True,
                 logging_level=logging.INFO if verbose else logging.ERROR)
    quiet_ray(verbose)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _summary(m: dict) -> str:
    rate = m["faces"] / m["processing_seconds"] if m["processing_seconds"] else 0.0
    return (f"run {m['run_id']} committed in {m['seconds']:.1f} s\n"
            f"  files: {m['files_ok']} ok, {m['files_error']} error, {m['files_skipped']} "
            f"skipped" + (f", {m['files_already_done']} already done (--incremental)"
                          if m.get("config", {}).get("incremental") else "")
            + (f", {m['files_other_model']} of them labelled by another model (--relabel "
               "redoes them)" if m.get("files_other_model") else "")
            + (f", {m['files_relabelled']} relabelled" if m.get("files_relabelled") else "")
            + "\n"
            f"  frames decoded: {m['frames']}   faces: {m['faces']}   faces/s: {rate:.1f}\n"
            f"  faces: {m['faces_path']}\n  files: {m['files_path']}\n"
            f"  manifest: {m['manifest_path']}")


def check_annotate(cfg: AnnotateConfig) -> dict:
    """Everything about the run's own inputs, before Ray starts and before anything is
    written: option ranges, the detector's weights, S3 bucket/endpoint/credentials, the
    model and its class names, the sources, and an output folder that is new, empty or a
    fer-batch output. Raises an error whose one line names the problem and the fix.
    Returns the checkpoint's metadata (pipeline.run does not load it again)."""
    from fer_batch import detect, pipeline, runs, sink, storage
    from fer_batch.model import load_checkpoint
    cfg.check()
    detect.check_detector(cfg.detector)  # its weights and runtime are installed
    if cfg.detect_on == "pool":  # (the detector rule is AnnotateConfig.check's)
        from fer_batch.detect_torch import check_torch_detector
        check_torch_detector()
    for uri, kind in [(cfg.model, "model"), *[(s, "source") for s in cfg.sources],
                      (cfg.output, "output")]:
        if storage.is_s3(uri):
            storage.check_access(uri, cfg.endpoint_url, kind=kind)
    for uri, kind in [*[(s, "source") for s in cfg.sources], (cfg.output, "output")]:
        if not storage.is_s3(uri):  # local checks first: they cost nothing
            storage.check_access(uri, cfg.endpoint_url, kind=kind)  # output: writable
    runs.Output(cfg.output, cfg.endpoint_url).check_ours()
    _, meta = load_checkpoint(cfg.model, cfg.endpoint_url)
    sink.check_class_names(meta["classes"], cfg.model)
    pipeline.check_geometry(cfg, meta)
    return meta


def annotate(cfg: AnnotateConfig, verbose: bool = False) -> int:
    from fer_batch import pipeline, runs, sink, storage
    from fer_batch.model import CheckpointError
    # the endpoint resolved here so Ray workers on other nodes use the driver's; no signature
    # of a presigned SOURCE reaches config.json or the run manifest
    cfg = dataclasses.replace(cfg, endpoint_url=storage.s3_endpoint(cfg.endpoint_url),
                              sources=tuple(storage.strip_credentials(s) for s in cfg.sources))
    try:  # fail fast, before Ray starts: options, S3, bad model, no source, foreign output
        meta = check_annotate(cfg)
    except (CheckpointError, storage.SourceError, ConfigError, sink.ClassNameError,
            runs.ForeignOutputError, OSError) as e:
        print(f"fer-batch annotate: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    init_ray(cfg.address, verbose)
    if cfg.device == "cuda" and not (cfg.address or os.environ.get("RAY_ADDRESS")):
        import ray
        if not ray.cluster_resources().get("GPU"):  # it would wait for a GPU for ever
            print("fer-batch annotate: error: --device cuda, but the local Ray sees no GPU; "
                  "use --device auto or cpu here, or --address a cluster with GPU nodes",
                  file=sys.stderr)
            return EXIT_USAGE
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM takes the same clean path as Ctrl-C
    try:
        manifest = pipeline.run(cfg, progress=lambda s: print(s, flush=True), meta=meta)
    except (runs.LockedError, runs.ForeignOutputError, storage.SourceError) as e:
        print(f"fer-batch annotate: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except runs.CommitError as e:  # set aside under OUT/_failed: later runs are not held up
        print(f"fer-batch annotate: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as e:  # the output cannot be written: permissions, full disk, S3 denied
        cause = os_error_in(e)  # Ray wraps a worker's OSError in its own traceback
        if cause is None:
            raise
        print(f"fer-batch annotate: error writing {cfg.output}: {one_line(cause)}. Nothing "
              "was committed; fix the output (free space, permissions) and run the same "
              "command again.", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("fer-batch annotate: interrupted; nothing of this run was committed. Run the same "
              "command again to redo it (add --incremental to keep earlier runs' work).",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    print(_summary(manifest), flush=True)
    return 0


def train(cfg: TrainConfig, verbose: bool = False) -> int:
    from fer_batch import train as train_mod
    try:  # fail fast, before Ray starts: options, data folder, --pretrained weights
        checked = train_mod.check_training(cfg)
    except (RuntimeError, ValueError, OSError) as e:
        print(f"fer-batch train: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    init_ray(cfg.address, verbose)
    metrics = train_mod.fit(cfg, checked)
    print(json.dumps({k: metrics[k] for k in ("accuracy", "macro_f1") if k in metrics}))
    return 0


def os_error_in(e: BaseException) -> OSError | None:
    """The OSError that caused e: e itself, or one down its chain of causes (Ray's task
    errors keep the worker's exception as ``cause``); None when there is none."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None)
        if isinstance(e, OSError) and not isinstance(inner, BaseException):
            return e
        e = inner if isinstance(inner, BaseException) else (e.__cause__ or e.__context__)
    return None


def one_line(e: BaseException) -> str:
    """An exception as one line: its first line, with an OSError's cause named plainly."""
    if isinstance(e, OSError) and e.strerror and e.filename:
        return f"{e.filename}: {e.strerror}"
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _small_command(args) -> int:
    """evaluate, report, compact: a bad model, folder or output ends in one line, exit 2."""
    from fer_batch import evaluate, readers, report, runs
    from fer_batch.model import CheckpointError
    try:
        if args.command == "evaluate":
            metrics = evaluate.evaluate_folder(args.data, args.model, args.output,
                                               args.endpoint_url, detect_faces=args.detect_faces,
                                               crop_margin=args.crop_margin,
                                               flip_average=args.flip_average,
                                               detector=args.detector, align=args.align)
            print(json.dumps({k: metrics.get(k) for k in ("accuracy", "macro_f1", "n")}))
        elif args.command == "report":
            print(report.write_report(args.output, args.html))
        else:
            print(readers.compact(args.output))
    except (CheckpointError, runs.ForeignOutputError, runs.LockedError, ValueError,
            OSError) as e:  # OSError: a read-only or full output, a missing folder
        print(f"fer-batch {args.command}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    t0 = time.perf_counter()
    if args.command == "annotate":
        code = annotate(config_from_args(AnnotateConfig, args), args.verbose)
    elif args.command == "train":
        code = train(config_from_args(TrainConfig, args), args.verbose)
    elif args.command in ("evaluate", "report", "compact"):
        code = _small_command(args)
    else:
        code = EXIT_USAGE
    logging.getLogger(__name__).debug("done in %.1fs", time.perf_counter() - t0)
    return code


if __name__ == "__main__":
    sys.exit(main())
