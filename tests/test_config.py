"""One home for every default: the CLI's flags, the config dataclasses and every stage built
without arguments agree (a FaceCropper() in a notebook behaves like `fer-batch annotate`)."""

from __future__ import annotations

import inspect

from fer_batch import cli, decode, detect, evaluate, pipeline, preprocess, tracks
from fer_batch.config import AnnotateConfig, DetectorSettings, TrainConfig


def parsed(*argv):
    return cli.get_parser().parse_args(list(argv))


def test_cli_defaults_are_the_config_defaults():
    a = cli.config_from_args(AnnotateConfig, parsed("annotate", "x.jpg"))
    assert a == AnnotateConfig(sources=("x.jpg",))
    t = cli.config_from_args(TrainConfig, parsed("train"))
    assert t == TrainConfig()
    assert t.data == ("../shared/data/ckplus48",) and a.model == "default"


def test_stages_built_without_arguments_match_the_cli():
    cfg = cli.config_from_args(AnnotateConfig, parsed("annotate", "x.jpg"))
    c = preprocess.FaceCropper()
    assert (c.sample_fps, c.every_n, c.max_pixels) == (cfg.sample_fps, cfg.every_n_frames,
                                                      cfg.max_pixels)
    assert c.detector.name == cfg.detector
    assert DetectorSettings() == DetectorSettings.of(cfg)
    haar = detect.load_detector("haar")  # the Haar settings, whichever detector is the default
    assert haar.kw["max_side"] == cfg.detect_max_side
    assert (haar.kw["scale_factor"], haar.kw["min_neighbors"],
            haar.kw["min_face"]) == (cfg.scale_factor, cfg.min_neighbors, cfg.min_face)
    assert (haar.kw["verifier"] is not None) == cfg.verify
    cf = detect.load_detector("centerface")
    assert cf.kw == dict(max_side=cfg.centerface_max_side, threshold=cfg.centerface_threshold,
                         min_face=cfg.min_face)
    assert c.max_attempts == cfg.max_file_retries + 1
    assert c.decode_threads == cfg.decode_threads == inspect.signature(
        decode.iter_frames).parameters["threads"].default
    assert c.crop_margin == TrainConfig().crop_margin
    assert decode.MAX_PIXELS == cfg.max_pixels
    assert inspect.signature(decode.iter_frames).parameters["sample_fps"].default == \
        cfg.sample_fps
    assert pipeline.IMAGES_PER_UNIT == cfg.images_per_task
    assert evaluate.PREDICT_BATCH == cfg.batch_size
    assert (tracks.IOU_THRESHOLD, tracks.MAX_GAP_S, tracks.SMOOTH_S) == (
        cfg.track_iou_threshold, cfg.track_max_gap_s, cfg.track_smooth_s)
    infer = __import__("fer_batch.infer", fromlist=["FacePredictor"])
    params = inspect.signature(infer.FacePredictor.__init__).parameters
    assert params["batch_size"].default == cfg.batch_size
    assert params["device"].default == cfg.device


def test_every_command_has_verbose_and_help_for_every_flag():
    parser = cli.get_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        flags = {a.dest: a for a in p._actions}
        assert "verbose" in flags, name
        for dest, action in flags.items():
            assert action.help, f"{name} {dest} has no --help text"
