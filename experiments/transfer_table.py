"""The shipped default model and transfer learning from FER2013: every number of RESULTS.md's
"Faces in the wild" block and of MODEL.md, each with the command that produced it.

Runs (select with --runs; each writes OUT/<name>/run.json):

  fer2013        record the FER2013 training (its metrics.json; the training itself is the
                 `fer-batch train` command in MODEL.md, run in the background: hours on a CPU)
  ship           write the fp16 default model fer_batch/models/default.pt from it
  fer2013_val    `fer-batch evaluate ../shared/fer2013/val` with the default model (7 classes)
  jaffe          the default model on JAFFE, all 7 of its classes, full photos through the
                 annotate crop path (Haar + crop_faces), at crop margins 0, 0.1 and 0.2
  faceapi        `fer-batch annotate` over the 7 faceapi_expr_*.jpg photos: label of the
                 largest face vs the expression in the file name
  ck_transfer    CK+48, the paper's protocol (random 80/20, Adam 1e-4, batch 8, 8 epochs)
                 fine-tuned from the default model (--pretrained default) = `make run`
  make_run       record instead the metrics.json that `make run` wrote (--make-run-dir)
  ck_scratch     the same from random weights (the paper's "without transfer learning")
  ck_folds       CK+48 5-fold subject-disjoint, fine-tuned from the default model

    .venv/bin/python experiments/transfer_table.py --runs fer2013,ship,fer2013_val,jaffe,faceapi
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import subprocess
import sys
import time

from fer_batch import evaluate, labeled, model as M
from fer_batch.cli import command_line
from fer_batch.config import DEFAULT_MODEL, TrainConfig
from paper_table import splice  # experiments/ is the script's folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")
FER_TRAIN, FER_VAL = f"{SHARED}/fer2013/train", f"{SHARED}/fer2013/val"
CKPLUS, JAFFE = f"{SHARED}/data/ckplus48", f"{SHARED}/data/jaffe"
FACEAPI = f"{SHARED}/data/photos/faceapi_expr_*.jpg"
MARGINS = (0.0, 0.1, 0.2)  # crop margins tried on JAFFE (0.1 = measured framing, the default)
FOLDS = 5


def rel(p: str) -> str:
    """A path as the commands in MODEL.md show it: relative to the repository, or ~/..."""
    if not os.path.isabs(p):
        return p
    home = os.path.expanduser("~")
    if not p.startswith(ROOT) and p.startswith(home + os.sep):
        return "~" + p[len(home):]
    return os.path.relpath(p, ROOT)


def save(out: str, name: str, record: dict) -> None:
    os.makedirs(f"{out}/{name}", exist_ok=True)
    with open(f"{out}/{name}/run.json", "w") as f:
        json.dump(record, f, indent=2)


def headline(m: dict) -> dict:
    keep = evaluate.HEADLINE + ("n", "n_train", "n_test", "per_class", "confusion_matrix",
                                "classes", "cv", "excluded_classes", "missing_classes", "ece",
                                "accuracy_at_coverage", "temperature")
    return {k: m[k] for k in keep if k in m}


def git_commit() -> str:
    return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()


def run_fer2013(out: str, model_dir: str) -> None:
    with open(f"{model_dir}/metrics.json") as f:
        m = json.load(f)
    cfg = dict(m["train_config"], data=tuple(m["train_config"]["data"]))
    command = command_line("train", TrainConfig(**cfg), rel)
    save(out, "fer2013", dict(command=command, model_dir=rel(model_dir), config=cfg,
                              history=m["history"], metrics=headline(m),
                              wall_seconds=m["wall_seconds"], model_id=m["model_id"],
                              calibration=m.get("calibration")))


def run_ship(out: str, model_dir: str, margin: float) -> None:
    """fp16 copy of the FER2013 model as the default model, with the measured crop margin."""
    _, meta = M.load_checkpoint(f"{model_dir}/model.pt")
    os.makedirs(os.path.dirname(DEFAULT_MODEL), exist_ok=True)
    model_id = M.export_half(f"{model_dir}/model.pt", DEFAULT_MODEL,
                             preprocessing=dict(meta["preprocessing"], crop_margin=margin))
    save(out, "ship", dict(source=rel(f"{model_dir}/model.pt"), source_model_id=meta["model_id"],
                           model_id=model_id, crop_margin=margin, commit=git_commit(),
                           bytes=os.path.getsize(DEFAULT_MODEL)))
    print(f"wrote {DEFAULT_MODEL} ({os.path.getsize(DEFAULT_MODEL) / 1e6:.1f} MB), "
          f"model_id {model_id}")


def run_eval(out: str, name: str, data: str, command: str, **kw) -> dict:
    t0 = time.perf_counter()
    m = evaluate.evaluate_folder(data, "default", f"{out}/{name}", **kw)
    save(out, name, dict(command=command, metrics=headline(m), model_id=m["model_id"],
                         seconds=time.perf_counter() - t0))
    return m


def run_jaffe(out: str) -> None:
    results = {}
    for detector in ("centerface", "haar"):  # annotate's default first
        for margin in MARGINS:
            t0 = time.perf_counter()
            m = evaluate.evaluate_folder(JAFFE, "default",
                                         f"{out}/jaffe/{detector}-margin{margin}",
                                         detect_faces=True, crop_margin=margin,
                                         detector=detector)
            results[f"--detector {detector} --crop-margin {margin}"] = dict(
                metrics=headline(m), seconds=time.perf_counter() - t0)
    save(out, "jaffe", dict(command=f"fer-batch evaluate {rel(JAFFE)} --detect-faces "
                                    "[--detector D --crop-margin M]", margins=results))


def run_faceapi(out: str) -> None:
    """The real annotate command over the 7 photos; the largest face's label per photo."""
    import fer_batch
    photos = sorted(glob.glob(FACEAPI))
    dst = f"{out}/faceapi/annotations"
    cmd = [os.path.join(os.path.dirname(sys.executable), "fer-batch"), "annotate", *photos,
           "--output", dst]
    subprocess.run(cmd, check=True)
    faces = fer_batch.read_faces(dst, as_pandas=True)[["source", "label", "w", "h"]]
    faces = faces.to_dict("records")
    rows = []
    for p in photos:
        mine = [f for f in faces if f["source"].endswith(os.path.basename(p))]
        want = labeled.canonical(os.path.basename(p)[len("faceapi_expr_"):-len(".jpg")])
        got = max(mine, key=lambda f: f["w"] * f["h"])["label"] if mine else None
        rows.append(dict(photo=os.path.basename(p), expected=want, label=got, faces=len(mine)))
    save(out, "faceapi", dict(command="fer-batch annotate ../shared/data/photos/faceapi_expr_*.jpg "
                              f"--output {rel(dst)}", photos=rows,
                              correct=sum(r["label"] == r["expected"] for r in rows)))


def run_train(out: str, name: str, cfg: TrainConfig, command: str) -> None:
    from fer_batch import train
    m = train.fit(cfg)
    save(out, name, dict(command=command, config=dataclasses.asdict(cfg), metrics=headline(m),
                         history=m.get("history"), wall_seconds=m["wall_seconds"]))


def run_record(out: str, name: str, metrics_path: str, command: str) -> None:
    """run.json from a metrics.json that a training already wrote."""
    with open(metrics_path) as f:
        m = json.load(f)
    save(out, name, dict(command=command, config=m.get("train_config"), metrics=headline(m),
                         history=m.get("history"), wall_seconds=m.get("wall_seconds")))


def ck_configs(out: str) -> dict:
    base = dict(data=(CKPLUS,), use_gpu="no")
    return {
        "ck_transfer": (TrainConfig(**base, pretrained="default", output=f"{out}/ck_transfer"),
                        f"fer-batch train {rel(CKPLUS)} --pretrained default"),
        "ck_scratch": (TrainConfig(**base, output=f"{out}/ck_scratch"),
                       f"fer-batch train {rel(CKPLUS)}"),
        "ck_folds": (TrainConfig(**base, pretrained="default", split="subject", folds=FOLDS,
                                 output=f"{out}/ck_folds"),
                     f"fer-batch train {rel(CKPLUS)} --pretrained default --split subject "
                     f"--folds {FOLDS}"),
    }


# --- rendering --------------------------------------------------------------------------------

def pct(x) -> str:
    return f"{100 * x:.2f}"


BEGIN, END = "<!-- BEGIN transfer_table.py -->", "<!-- END transfer_table.py -->"


def load_runs(out: str) -> dict:
    runs = {}
    for p in sorted(glob.glob(f"{out}/*/run.json")):
        with open(p) as f:
            runs[os.path.basename(os.path.dirname(p))] = json.load(f)
    return runs


def metric_row(label: str, command: str, m: dict, target: str) -> str:
    if "cv" in m:
        cells = [f"{pct(m['cv'][k]['mean'])} ± {pct(m['cv'][k]['std'])}" for k in evaluate.HEADLINE]
    else:
        cells = [pct(m[k]) for k in evaluate.HEADLINE]
    n = m.get("n_test", m.get("n", ""))
    return f"| {label} | {' | '.join(cells)} | {n} | {target} | `{command}` |"


def render(out: str) -> str:
    runs = load_runs(out)
    lines = [BEGIN, "_Generated by `experiments/transfer_table.py` from the run.json files it "
             "wrote; nothing in this block is typed by hand._", "",
             "| what | accuracy | macro P | macro R | macro F1 | n | target | command |",
             "|---|---|---|---|---|---|---|---|"]
    rows = (("fer2013_val", "FER2013 val (PublicTest), 7 classes, default model", ">= 66"),
            ("ck_transfer", "CK+48 paper protocol, random 80/20, FER2013 transfer", ">= 99.49"),
            ("ck_scratch", "CK+48 paper protocol, random 80/20, from scratch", "(95.41 paper)"),
            ("ck_folds", f"CK+48 {FOLDS}-fold subject-disjoint, FER2013 transfer", ">= 90"))
    for name, label, target in rows:
        if name in runs:
            lines.append(metric_row(label, runs[name]["command"], runs[name]["metrics"], target))
    if "jaffe" in runs:
        for flags, r in runs["jaffe"]["margins"].items():
            lines.append(metric_row(f"JAFFE, 7 classes, annotate crop path, {flags}",
                                    f"fer-batch evaluate {rel(JAFFE)} --detect-faces {flags}",
                                    r["metrics"], ">= 45"))
    if "fer2013_val" in runs and "ece" in runs["fer2013_val"]["metrics"]:
        m = runs["fer2013_val"]["metrics"]
        cover = ", ".join(f"{100 * float(c):.0f}%: {pct(v['accuracy'])}"
                          for c, v in m["accuracy_at_coverage"].items())
        lines += ["", f"Scores on FER2013 val (temperature {m['temperature']:.3f} from the "
                  f"checkpoint, fitted on held-out training images): ECE (15 bins) "
                  f"**{pct(m['ece'])}%** (target <= 3); accuracy of the most confident "
                  f"faces by coverage: {cover} (target at 80%: >= 72)."]
    if "faceapi" in runs:
        r = runs["faceapi"]
        lines += ["", f"faceapi_expr photos (`{r['command']}`): **{r['correct']} of "
                  f"{len(r['photos'])}** labelled as their file name says (target >= 6):", "",
                  "| photo | expected | label (largest face) | faces |", "|---|---|---|---|"]
        lines += [f"| {p['photo']} | {p['expected']} | {p['label']} | {p['faces']} |"
                  for p in r["photos"]]
    if "fer2013" in runs:
        r = runs["fer2013"]
        h = r["history"]
        epoch_min = sum(x.get("seconds") or 0 for x in h) / 60
        span = f"epochs {h[0]['epoch']}-{h[-1]['epoch']}" if h else "no epochs"
        lines += ["", f"FER2013 training (`{r['command']}`): {span} of its schedule in this "
                  f"run, {epoch_min:.0f} min of epochs on 2 CPU cores; test (= FER2013 val) "
                  "accuracy per epoch (no flip averaging, the training's own metric): "
                  + ", ".join(f"{x['epoch']}: {pct(x['test_acc'])}" for x in h) + "."]
        cal = r.get("calibration")
        if cal:
            lines += ["", f"Temperature {cal['temperature']:.3f}, fitted on {cal['n']} "
                      "training images held out of the training (`--calibration-fraction`): "
                      f"their ECE {pct(cal['ece_before'])}% -> {pct(cal['ece_after'])}%, NLL "
                      f"{cal['nll_before']:.3f} -> {cal['nll_after']:.3f}."]
    if "ship" in runs:
        r = runs["ship"]
        lines += ["", f"Shipped as `fer_batch/models/default.pt` (fp16, "
                  f"{r['bytes'] / 1e6:.1f} MB, model_id {r['model_id']}, from {r['source']} "
                  f"model_id {r['source_model_id']}, crop margin {r['crop_margin']}), written "
                  f"at commit {r['commit']}."]
    lines.append(END)
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="fer2013,ship,fer2013_val,jaffe,faceapi")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "transfer_table"))
    p.add_argument("--model-dir", default=os.path.join(ROOT, "runs", "fer2013"),
                   help="output folder of the FER2013 training")
    p.add_argument("--crop-margin", type=float, default=TrainConfig().crop_margin)
    p.add_argument("--make-run-dir", default=os.path.join(ROOT, "runs", "main", "model"),
                   help="the model folder `make run` wrote (for --runs make_run)")
    p.add_argument("--results", nargs="+", default=[os.path.join(ROOT, "RESULTS.md"),
                                                    os.path.join(ROOT, "MODEL.md")])
    args = p.parse_args(argv)
    names = [n for n in args.runs.split(",") if n]
    ray_started = False
    for name in names:
        if name == "fer2013":
            run_fer2013(args.out, args.model_dir)
        elif name == "ship":
            run_ship(args.out, args.model_dir, args.crop_margin)
        elif name == "fer2013_val":
            run_eval(args.out, name, FER_VAL, f"fer-batch evaluate {rel(FER_VAL)}")
        elif name == "jaffe":
            run_jaffe(args.out)
        elif name == "faceapi":
            run_faceapi(args.out)
        elif name == "make_run":
            run_record(args.out, "ck_transfer", f"{args.make_run_dir}/metrics.json",
                       "make run  (= fer-batch train ../shared/data/ckplus48 --pretrained "
                       "default)")
        elif name in ck_configs(args.out):
            if not ray_started:
                import ray
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
                ray_started = True
            cfg, command = ck_configs(args.out)[name]
            run_train(args.out, name, cfg, command)
        else:
            raise SystemExit(f"unknown run {name!r}")
    block = render(args.out)
    for path in args.results:
        splice(path, block, BEGIN, END)


if __name__ == "__main__":
    main()
