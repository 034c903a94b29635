"""fer_batch.train and fer_batch.evaluate on real CK+48 images with a real local Ray.

One real Ray Train run (2 CPU workers, a 6-image-per-class slice copied to tmp_path, plus a
corrupt file) is shared by the end-to-end tests: the first epoch of a 3-epoch campaign
(--stop-after 1), which the campaign test resumes and the S3 test repeats from S3. The
split tests are pure functions over the full labels.csv.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import upload_tree
from fer_batch import cli, evaluate, labeled, train, train_loop
from fer_batch.config import TrainConfig
from fer_batch.model import load_checkpoint

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
CKPLUS = DATA / "ckplus48"
PER_CLASS = 6  # images per class in the training slice: 42 images, ~1 min on 2 cores
CORRUPT = "anger/S999_001_00000001.png"  # truncated PNG header, added to the slice

needs_data = pytest.mark.skipif(not CKPLUS.is_dir(),
                                reason=f"CK+48 not found at {CKPLUS} (shared test data)")


def copy_slice(dst: Path, per_class: int) -> None:
    """The first per_class images of each class, and labels.csv, under dst."""
    for cls in sorted(p.name for p in CKPLUS.iterdir() if p.is_dir()):
        (dst / cls).mkdir(parents=True)
        for f in sorted((CKPLUS / cls).iterdir())[:per_class]:
            shutil.copy(f, dst / cls / f.name)
    shutil.copy(CKPLUS / "labels.csv", dst / "labels.csv")


# the shared run: the first epoch of a campaign planned for 3 (restarts schedule)
CAMPAIGN = dict(epochs=3, stop_after=1, schedule="restarts", lr=1e-3, batch_size=16,
                split="subject", num_workers=2, use_gpu="no", seed=0, run_name="campaign")


@pytest.fixture(scope="module")
def trained(ray_s3, tmp_path_factory):
    """(config, metrics, root) of the shared run. Its Ray (ray_s3) carries the S3 test
    user's settings, for the run from S3 below."""
    root = tmp_path_factory.mktemp("train")
    data, out = root / "data", root / "out"
    copy_slice(data, PER_CLASS)
    (data / CORRUPT).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    cfg = TrainConfig(data=(str(data),), output=str(out), storage_path=str(root / "store"),
                      **CAMPAIGN)
    metrics = train.fit(cfg)
    return cfg, metrics, root


# --- pure: splits, subjects, schedule ---------------------------------------------------------

@needs_data
def test_subject_split_never_leaks():
    paths, labels, classes = labeled.list_labeled(str(CKPLUS))
    y = np.array([classes.index(c) for c in labels])
    groups = labeled.read_subjects(str(CKPLUS), paths)
    with open(CKPLUS / "labels.csv") as f:
        table = {r["path"]: r["subject"] for r in csv.DictReader(f)}
    assert len(paths) == 981 and len(set(groups)) == 118
    assert all(table[p] == g for p, g in zip(paths, groups))  # labels.csv, not the regex
    for seed in range(3):
        tr, te = train.split_indices(y, groups, "subject", 0.2, seed)
        assert not set(groups[tr]) & set(groups[te])
        assert len(tr) + len(te) == len(y) and 0.1 < len(te) / len(y) < 0.3
        assert set(y[te]) == set(range(len(classes)))  # stratified: every class is tested
    folds = train.fold_indices(y, groups, 5, seed=0)
    assert np.array_equal(np.sort(np.concatenate([te for _, te in folds])), np.arange(len(y)))
    for tr, te in folds:
        assert not set(groups[tr]) & set(groups[te])


@needs_data
def test_random_split_is_stratified_and_seeded():
    paths, labels, classes = labeled.list_labeled(str(CKPLUS))
    y = np.array([classes.index(c) for c in labels])
    tr, te = train.split_indices(y, None, "random", 0.2, seed=0)
    assert len(te) == 197 and not set(tr) & set(te)
    assert np.allclose(np.bincount(y[te]) / len(te), np.bincount(y) / len(y), atol=0.01)
    assert np.array_equal(te, train.split_indices(y, None, "random", 0.2, seed=0)[1])


def test_subject_from_pattern_when_not_in_labels(tmp_path):
    groups = labeled.read_subjects(str(tmp_path), ["anger/S042_001_00000007.png",
                                                 "fear/KA.FE1.2.tiff"])
    assert list(groups) == ["S042", "KA"]
    with pytest.raises(ValueError, match="subject-pattern"):
        labeled.read_subjects(str(tmp_path), ["anger/001.png"])


def test_lr_schedules():
    assert train_loop.lr_at(5, 100, 1e-4, "constant") == 1e-4
    one = [train_loop.lr_at(s, 100, 1e-3, "onecycle") for s in range(100)]
    assert abs(max(one) - 1e-3) < 1e-6 and one[0] < 1e-4 and one[-1] < 1e-5
    cos = [train_loop.lr_at(s, 100, 1e-3, "cosine") for s in range(100)]
    assert cos[0] == 0 and abs(max(cos) - 1e-3) < 1e-6 and cos[-1] < 1e-5


def test_cpu_workers_share_the_cpus():
    assert train.cpu_threads(2, 2, 2) == 1  # this 2-core machine: 2 workers x 1 thread
    assert train.cpu_threads(2, 8, 8) == 4  # a laptop: every core used
    assert train.cpu_threads(2, 64, 16) == 16  # a cluster: at most one node per worker
    assert train.cpu_threads(4, 2, 2) == 1


def test_channels_option_is_parsed_and_checked():
    assert train.channel_names(TrainConfig()) == ("equalized",)
    assert train.channel_names(TrainConfig(channels="equalized, canny")) == ("equalized", "canny")
    for bad in ("", "equalized,sobel"):
        with pytest.raises(ValueError, match="--channels"):
            train.channel_names(TrainConfig(channels=bad))


def test_augment_keeps_shape_and_dtype():
    faces = np.random.default_rng(0).integers(0, 256, (4, 1, 48, 48), dtype=np.uint8)
    out = train_loop.augment_faces(faces, np.random.default_rng(1))
    assert out.shape == faces.shape and out.dtype == np.uint8 and not np.array_equal(out, faces)


def test_missing_pretrained_file_fails_fast(tmp_path):
    import cv2
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        cv2.imwrite(str(tmp_path / cls / "x.png"), np.zeros((48, 48), np.uint8))
    cfg = TrainConfig(data=(str(tmp_path),), pretrained=str(tmp_path / "nope.pth"))
    with pytest.raises(RuntimeError, match="no such file"):
        train.check_training(cfg)


# --- real Ray Train ---------------------------------------------------------------------------

@needs_data
def test_train_writes_a_loadable_checkpoint(trained):
    cfg, metrics, _ = trained
    out = Path(cfg.output)
    for name in ("model.pt", "metrics.json", "split.json", "confusion_matrix.png",
                 "training_curves.png"):
        assert (out / name).stat().st_size > 0, name
    assert not (out / "_ray_train").exists()  # the checkpoints are in --storage-path
    model, meta = load_checkpoint(str(out / "model.pt"))
    assert meta["classes"] == ["anger", "contempt", "disgust", "fear", "happiness", "sadness",
                               "surprise"]
    assert meta["model_id"] == metrics["model_id"]
    assert meta["train_config"]["split"] == "subject" and meta["train_config"]["epochs"] == 3
    assert meta["train_config"]["stop_after"] == 1
    assert meta["metrics"]["accuracy"] == pytest.approx(metrics["accuracy"])
    on_disk = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "macro_precision", "macro_recall", "macro_f1", "per_class",
                "confusion_matrix", "classes", "n_train", "n_test", "epochs", "seed",
                "history", "wall_seconds"):
        assert key in on_disk, key
    assert len(on_disk["history"]) == 1 and on_disk["history"][0]["test_acc"] is not None
    # the workers' own end-of-epoch test accuracy equals the driver's scoring of model.pt
    assert on_disk["history"][-1]["test_acc"] == pytest.approx(metrics["accuracy"])
    split = json.loads((out / "split.json").read_text())
    train_subjects = {p.rsplit("/", 1)[-1][:4] for p in split["train"]}
    assert not train_subjects & set(split["test_subjects"])


@needs_data
def test_corrupt_image_is_reported_and_skipped(trained):
    cfg, metrics, _ = trained
    assert [s["path"] for s in metrics["skipped"]] == [f"{cfg.data[0]}/{CORRUPT}"]
    assert metrics["n_train"] + metrics["n_test"] == 7 * PER_CLASS
    _, meta = load_checkpoint(str(Path(cfg.output) / "model.pt"))
    assert meta["data"]["skipped"][0]["path"].endswith(CORRUPT)


@needs_data
def test_evaluate_reproduces_training_metrics(trained, tmp_path):
    cfg, metrics, _ = trained
    split = json.loads((Path(cfg.output) / "split.json").read_text())
    for rel in split["test"]:
        (tmp_path / "test" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(cfg.data[0]) / rel, tmp_path / "test" / rel)
    got = evaluate.evaluate_folder(str(tmp_path / "test"), str(Path(cfg.output) / "model.pt"),
                                   str(tmp_path / "eval"), flip_average=False)
    assert got["confusion_matrix"] == metrics["confusion_matrix"]
    for key in evaluate.HEADLINE:
        assert got[key] == pytest.approx(metrics[key])
    assert (tmp_path / "eval" / "confusion_matrix.png").stat().st_size > 0


@needs_data
def test_evaluate_reports_unknown_and_missing_classes(trained, tmp_path):
    cfg, _, _ = trained
    data = tmp_path / "data"
    copy_slice(data, 2)
    shutil.rmtree(data / "contempt")
    shutil.copytree(data / "fear", data / "neutral")  # a class the CK+ model does not know
    got = evaluate.evaluate_folder(str(data), str(Path(cfg.output) / "model.pt"), None)
    assert got["excluded_classes"] == {"neutral": 2}
    assert got["missing_classes"] == ["contempt"]
    assert got["n"] == 12 and got["classes"][1] == "contempt"
    assert got["per_class"]["contempt"]["support"] == 0


# --- transfer learning and several folders (issue 12) -----------------------------------------

def test_pretrained_from_our_checkpoint_reuses_the_backbone(random_checkpoint, tmp_path):
    """--pretrained PATH/model.pt: every backbone weight is the source's, the classifier is
    new and sized for the new classes."""
    import torch
    src, _ = load_checkpoint(random_checkpoint)
    cfg = TrainConfig(data=(str(tmp_path),), pretrained=random_checkpoint)
    state = train.pretrained_state(cfg, ["x", "y", "z"], in_channels=1)
    for k, v in src.state_dict().items():
        if k.startswith("net.fc."):
            assert state[k].shape[0] == 3
        else:
            assert torch.equal(state[k], v), k
    with pytest.raises(RuntimeError, match="input plane"):  # another input shape is refused
        train.pretrained_state(TrainConfig(pretrained=random_checkpoint,
                                           channels="equalized,canny"), ["x", "y", "z"], 2)


@needs_data
def test_several_folders_train_on_the_union_with_a_held_out_folder(trained, tmp_path):
    """Two folders with different names for the same expressions (FER2013 style 'happy',
    CK+ 'happiness') train one model on the union of their classes; a third folder is the
    test set; the model starts from the first test's checkpoint."""
    import cv2
    cfg0, _, _ = trained
    ck, wild, test = tmp_path / "ck", tmp_path / "wild", tmp_path / "test"
    copy_slice(ck, 3)
    src = sorted((CKPLUS / "happiness").iterdir())
    for folder, names in ((wild, ("happy", "neutral", "Angry")), (test, ("happy", "calm"))):
        for k, name in enumerate(names):
            (folder / name).mkdir(parents=True)
            for j in range(3):
                img = cv2.imread(str(src[10 + 3 * k + j]), cv2.IMREAD_GRAYSCALE)
                cv2.imwrite(str(folder / name / f"{j}.png"), img)
    cfg = TrainConfig(data=(str(ck), str(wild)), test_data=str(test), output=str(tmp_path / "o"),
                      pretrained=str(Path(cfg0.output) / "model.pt"), epochs=1,
                      num_workers=1, use_gpu="no", batch_size=8)
    metrics = train.fit(cfg)
    _, meta = load_checkpoint(str(tmp_path / "o" / "model.pt"))
    assert meta["classes"] == ["anger", "contempt", "disgust", "fear", "happiness", "neutral",
                               "sadness", "surprise"]
    assert metrics["n_train"] == 7 * 3 + 3 * 3 and metrics["n_test"] == 6
    assert metrics["per_class"]["neutral"]["support"] == 3  # 'calm' is neutral
    assert metrics["per_class"]["happiness"]["support"] == 3
    split = json.loads((tmp_path / "o" / "split.json").read_text())
    assert len(split["test"]) == 6 and all(p.startswith(str(test)) for p in split["test"])
    assert not (tmp_path / "o" / "_ray_train").exists()  # a run that ended drops its epochs


def test_resume_from_a_folder_without_state_fails_fast(tmp_path):
    import cv2
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        cv2.imwrite(str(tmp_path / cls / "x.png"), np.zeros((48, 48), np.uint8))
    (tmp_path / "snapshot.json").write_text("{}")
    for bad in (tmp_path / "snapshot.json", tmp_path / "nothing"):
        with pytest.raises(ValueError, match="checkpoint_"):
            train.check_training(TrainConfig(data=(str(tmp_path),), resume_from=str(bad)))


def test_the_new_classifier_of_a_fine_tune_depends_on_the_seed_only(random_checkpoint):
    """--pretrained keeps the backbone and draws a new classifier: from --seed, not from
    whatever random numbers the process used before (make run repeats on one machine)."""
    import torch
    cfg = TrainConfig(pretrained=random_checkpoint, seed=3)
    classes = list("abcdefg")  # not the source's classes: a new classifier
    a = train.pretrained_state(cfg, classes, 1)
    torch.rand(1000)  # other random draws in between change nothing
    b = train.pretrained_state(cfg, classes, 1)
    c = train.pretrained_state(dataclasses.replace(cfg, seed=4), classes, 1)
    assert torch.equal(a["net.fc.weight"], b["net.fc.weight"])
    assert not torch.equal(a["net.fc.weight"], c["net.fc.weight"])


def test_a_model_trained_on_the_same_classes_goes_on_with_its_classifier(random_checkpoint):
    """--pretrained default on FER2013 again (a campaign's start): the classes are the
    source's, in order, so its classifier is kept, not redrawn."""
    import torch

    from fer_batch.model import EMOTIONS
    src, _ = load_checkpoint(random_checkpoint)
    state = train.pretrained_state(TrainConfig(pretrained=random_checkpoint), list(EMOTIONS), 1)
    assert all(torch.equal(state[k], v) for k, v in src.state_dict().items())


# --- a campaign that survives every stop (issue 22) -----------------------------------------

def test_restarts_schedule_is_annealed_at_the_end_of_each_cycle():
    total = 700
    lr = [train_loop.lr_at(s, total, 1e-3, "restarts") for s in range(total)]
    ends = train_loop.restart_ends(70)
    assert ends == [10, 30, 70]
    for end in ends:  # the last step of each cycle is near 0, the next one restarts
        assert lr[end * 10 - 1] < 1e-5
        if end < 70:
            assert lr[end * 10 + 1] > lr[end * 10 - 1]
    assert abs(max(lr[:100]) - 1e-3) < 1e-5 and abs(max(lr[300:]) - 1e-3) < 1e-5
    # a cycle is a cosine of its own: the middle of cycle 2 is at half the peak
    assert abs(lr[200] - 1e-3 * train_loop._cosine(0.5)) < 1e-9


def test_calibration_split_is_stratified_and_disjoint():
    y = np.repeat(np.arange(4), [100, 50, 30, 20])
    tr0 = np.arange(len(y))[::2]
    tr, cal = train.calibration_split(y, tr0, 0.2, seed=0)
    assert not set(tr) & set(cal) and sorted(set(tr) | set(cal)) == sorted(tr0)
    assert len(cal) == 20 and np.bincount(y[cal], minlength=4).tolist() == [10, 5, 3, 2]
    same = train.calibration_split(y, tr0, 0.2, seed=0)
    assert np.array_equal(same[1], cal)
    tr, cal = train.calibration_split(y, tr0, 0.0)
    assert np.array_equal(tr, tr0) and len(cal) == 0


def test_resume_from_finds_the_newest_checkpoint_of_a_run(tmp_path):
    run = tmp_path / "run"
    for name in ("checkpoint_2026-12-04_10-00-00.000001", "checkpoint_2026-12-04_11-00-00.000001"):
        (run / name).mkdir(parents=True)
        (run / name / "state.pt").write_bytes(b"x")
    (run / "checkpoint_2026-12-04_12-00-00.000001").mkdir()  # unfinished: no state.pt
    assert train_loop.latest_checkpoint(str(run)).endswith("11-00-00.000001")
    one = run / "checkpoint_2026-12-04_10-00-00.000001"
    assert train_loop.latest_checkpoint(str(one)) == str(one)


def test_stop_after_ends_the_loop_early():
    assert TrainConfig(epochs=70, stop_after=10).last_epoch == 10
    assert TrainConfig(epochs=70).last_epoch == 70
    assert TrainConfig(epochs=5, stop_after=10).last_epoch == 5


@needs_data
def test_stop_after_keeps_the_checkpoints_and_resume_goes_on_with_the_schedule(trained,
                                                                             tmp_path, capsys):
    """A campaign in pieces, with a real Ray Train: the shared run (--stop-after 1) wrote
    model.pt and kept the per-epoch checkpoint; resuming with the same --stop-after trains
    nothing (no Ray Train started) and hands back the same model; --stop-after 2 goes on
    from epoch 2 with epoch 1 as it was."""
    cfg, first, root = trained
    run = root / "store" / "campaign"
    assert [h["epoch"] for h in first["history"]] == [1]
    assert any(p.name.startswith("checkpoint_") for p in run.iterdir())
    capsys.readouterr()
    again = train.fit(dataclasses.replace(cfg, output=str(tmp_path / "again"),
                                          resume_from=str(run)))
    assert again["model_id"] == first["model_id"] and len(again["history"]) == 1
    assert "already reached epoch 1: nothing to train" in capsys.readouterr().out
    on = train.fit(dataclasses.replace(cfg, stop_after=2, output=str(tmp_path / "e2"),
                                       resume_from=str(run)))
    assert [h["epoch"] for h in on["history"]] == [1, 2]
    assert on["history"][0] == first["history"][0]
    assert on["model_id"] != first["model_id"]
    lr2 = on["history"][1]["lr"]  # the schedule of the whole 3-epoch run, not a new one
    n_train = len(json.loads((Path(cfg.output) / "split.json").read_text())["train"])
    steps = math.ceil(math.ceil(n_train / cfg.num_workers) / cfg.batch_size)  # a worker's
    assert lr2 == pytest.approx(train_loop.lr_at(2 * steps - 1, 3 * steps, cfg.lr, "restarts"))
    # on a machine without the checkpoints: epoch 1's model.pt and --start-epoch 1 go on
    # with epoch 2 of the same schedule (a new optimizer, the same learning rates)
    moved = train.fit(dataclasses.replace(cfg, stop_after=2, run_name="elsewhere",
                                          output=str(tmp_path / "moved"), start_epoch=1,
                                          pretrained=str(Path(cfg.output) / "model.pt")))
    assert [h["epoch"] for h in moved["history"]] == [2]
    assert moved["history"][0]["lr"] == pytest.approx(lr2)
    with pytest.raises(ValueError, match="--start-epoch"):  # needs weights to go on from
        train.check_training(dataclasses.replace(cfg, stop_after=2, start_epoch=1,
                                                 output=str(tmp_path / "x")))


@needs_data
def test_train_from_s3_to_s3_matches_local(trained, s3, capsys):
    """The shared run again with DATA, --output and the per-epoch checkpoints on S3, through
    the CLI: the same images, the same split, and the checkpoint written to S3 loads.

    Also the determinism check: the two trainings see the same images with the same seed,
    so on one machine they give the same weights (model_id is their hash) and metrics.
    Across machines (other CPUs, thread counts, bf16 support) floating-point order differs
    and so do the figures: the README quotes a range for make run, not one number."""
    from s3_server import IN, OUT
    cfg, _, root = trained
    upload_tree(s3, root / "data", IN, "ckplus")
    from_s3 = dataclasses.replace(cfg, data=(f"s3://{IN}/ckplus",), output=f"s3://{OUT}/train",
                                  storage_path=None)  # the checkpoints under the output
    assert cli.main(cli.command_line("train", from_s3).split()[1:]) == 0
    got = {}
    for name in ("split.json", "metrics.json"):
        body = s3.get_object(Bucket=OUT, Key=f"train/{name}")["Body"].read()
        got[name] = json.loads(body)
    out = Path(cfg.output)  # subjects are named with their folder: the same, moved to S3
    local_split = (out / "split.json").read_text().replace(cfg.data[0], f"s3://{IN}/ckplus")
    assert got["split.json"] == json.loads(local_split)
    local_metrics = json.loads((out / "metrics.json").read_text())
    for key in ("classes", "n_train", "n_test", "split", "model_id", "confusion_matrix"):
        assert got["metrics.json"][key] == local_metrics[key], key
    assert got["metrics.json"]["history"][0]["train_loss"] == \
        local_metrics["history"][0]["train_loss"]
    assert [s["path"] for s in got["metrics.json"]["skipped"]] == [f"s3://{IN}/ckplus/{CORRUPT}"]
    assert s3.list_objects_v2(Bucket=OUT, Prefix="train/_ray_train/campaign/")["KeyCount"] > 0
    model, meta = load_checkpoint(f"s3://{OUT}/train/model.pt")
    assert meta["classes"] == local_metrics["classes"]

    # --resume-from an S3 run folder: its newest checkpoint is found and read on S3, and as
    # it reached --stop-after there is nothing to train (the local resume test goes on from
    # there through the CLI); a folder without a checkpoint fails fast
    run = f"s3://{OUT}/train/_ray_train/campaign"
    assert train_loop.latest_checkpoint(run).startswith(f"{run}/checkpoint_")
    resumed = dataclasses.replace(from_s3, resume_from=run)
    state = train.reached_state(resumed)
    assert "already reached epoch 1: nothing to train" in capsys.readouterr().out
    assert state["epoch"] == 1 and state["history"][0]["train_loss"] == \
        local_metrics["history"][0]["train_loss"]
    with pytest.raises(ValueError, match="no state.pt there nor in a checkpoint_"):
        train.check_training(dataclasses.replace(resumed, resume_from=f"s3://{OUT}/train"))


def test_augment_tensor_draws_transforms_on_the_device_reproducibly():
    """The GPU run's augmentation (data stays on the device): shape and dtype kept, the same
    seed gives the same batch, another seed another one, and a face stays mostly a face."""
    import torch
    faces = np.stack([np.tile(np.linspace(0, 255, 48, dtype=np.uint8), (48, 1))[None]] * 8)
    x = torch.from_numpy(faces)

    def run(seed):
        g = torch.Generator()
        g.manual_seed(seed)
        return train_loop.augment_tensor(x, g)

    a, b, c = run(1), run(1), run(2)
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, x)
    flipped = (a[:, 0, 24, :8].float().mean(1) > a[:, 0, 24, -8:].float().mean(1))
    assert 0 < int(flipped.sum()) < 8  # some mirrored (bright left), some not
    diff = (a.float() - torch.where(flipped[:, None, None, None], x.flip(-1), x).float())
    assert diff.abs().mean() < 40  # shifted, turned, lit: still the same picture
