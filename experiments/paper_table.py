"""Reproduce the paper's Table II on CK+48 and add the subject-independent protocol.

Runs (select with --runs; each writes OUT/<name>/ and OUT/<name>/run.json):

  imagenet        try the ImageNet weights (Table II "with transfer learning"); offline this
                  records "unavailable offline" and trains nothing
  paper           the paper's recipe from scratch: random stratified 80/20, Adam lr 1e-4,
                  batch 8, 8 epochs, constant lr (= `fer-batch train` defaults)
  tuned           the same split with the engineered recipe (TUNED below)
  subject         TUNED on a subject-disjoint 80/20 split (no person in train and test)
  subject_folds   TUNED, FOLDS-fold cross-validation by subject (mean +- std)
  jaffe           cross-dataset: the `tuned` CK+ model evaluated on JAFFE (shared classes;
                  faces cropped with the Haar cascade, neutral left out)

Then the generated block of RESULTS.md (between its BEGIN/END markers) is re-rendered from
every run.json found (--render-only re-renders without training).

    .venv/bin/python experiments/paper_table.py --runs imagenet,paper,tuned,subject_folds,jaffe
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time

import ray
import torch

from fer_batch import evaluate, train
from fer_batch.cli import command_line
from fer_batch.config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = {  # Table II of the paper, percent: (with transfer learning, without)
    "accuracy": (99.49, 95.41), "macro_precision": (99.49, 96.0),
    "macro_recall": (99.71, 91.41), "macro_f1": (99.60, 93.11)}


FOLDS = 3  # subject folds: 3 x 20 epochs fit a 40-minute CPU budget here; --folds 5 also works
TUNED = dict(epochs=20, schedule="cosine", batch_size=4)  # the paper's Adam 1e-4 and global
# batch 8 (4 per worker x 2 workers), trained 2.5x longer with a cosine-decayed learning rate;
# evidence in RESULTS.md (the paper recipe was still rising at epoch 8; 8 per worker, i.e. a
# global batch of 16, reached 94.92 % after 20 epochs)


def configs(data: str, out: str, seed: int) -> dict:
    base = dict(data=(data,), seed=seed, use_gpu="no", num_workers=2)
    return {
        "paper": TrainConfig(**base, output=f"{out}/paper", split="random"),
        "tuned": TrainConfig(**base, **TUNED, output=f"{out}/tuned", split="random"),
        "subject": TrainConfig(**base, **TUNED, output=f"{out}/subject", split="subject"),
        "subject_folds": TrainConfig(**base, **TUNED, output=f"{out}/subject_folds",
                                     split="subject", folds=FOLDS),
    }


def cli_command(cfg: TrainConfig) -> str:
    """The `fer-batch train` command line that trains cfg (flags that differ from defaults)."""
    rel = lambda p: os.path.relpath(p, ROOT) if os.path.isabs(p) else p  # noqa: E731
    return command_line("train", cfg, rel)


def save(out: str, name: str, record: dict) -> None:
    os.makedirs(f"{out}/{name}", exist_ok=True)
    with open(f"{out}/{name}/run.json", "w") as f:
        json.dump(record, f, indent=2)


def run_imagenet(out: str) -> None:
    t0 = time.perf_counter()
    try:
        train.pretrained_state(TrainConfig(pretrained="imagenet"), 7, 1)
        status = "available (not trained here: CPU budget)"
    except RuntimeError as e:
        status = f"unavailable offline: {e}"
    print(f"imagenet weights: {status}", flush=True)
    save(out, "imagenet", dict(status=status, seconds=time.perf_counter() - t0))


def run_train(out: str, name: str, cfg: TrainConfig, command: str) -> None:
    train.fit(cfg)
    record(out, name, cfg, command)


def record(out: str, name: str, cfg: TrainConfig, command: str) -> None:
    """run.json from the metrics.json that fit wrote (also --record-only, after a crash)."""
    with open(f"{out}/{name}/metrics.json") as f:
        metrics = json.load(f)
    cv = "cv" in metrics
    save(out, name, dict(name=name, command=command, cli=cli_command(cfg),
                         config=dataclasses.asdict(cfg),
                         wall_seconds=metrics["wall_seconds"],
                         train_seconds=sum(h["seconds"] for h in metrics.get("history", [])),
                         metrics={k: v for k, v in metrics.items() if k != "folds"},
                         folds=[{k: f[k] for k in evaluate.HEADLINE + ("n_train", "n_test")}
                                for f in metrics["folds"]] if cv else []))


def run_jaffe(out: str, jaffe: str) -> None:
    t0 = time.perf_counter()
    m = evaluate.evaluate_folder(jaffe, f"{out}/tuned/model.pt", f"{out}/jaffe",
                                 detect_faces=True)
    save(out, "jaffe", dict(name="jaffe", wall_seconds=time.perf_counter() - t0,
                            metrics={k: v for k, v in m.items()}))


def pct(x) -> str:
    return f"{100 * x:.2f}"


BEGIN, END = "<!-- BEGIN paper_table.py -->", "<!-- END paper_table.py -->"
COLUMNS = (("paper", "ours: paper recipe, random split"),
           ("tuned", "ours: engineered, random split"),
           ("subject", "ours: engineered, subject split"),
           ("subject_folds", "ours: engineered, %d-fold by subject" % FOLDS))


def render(out: str) -> str:
    """The generated block: Table II next to ours, runs, per-epoch curves, JAFFE."""
    runs = {}
    for name in sorted(os.listdir(out)) if os.path.isdir(out) else []:
        p = f"{out}/{name}/run.json"
        if os.path.exists(p):
            with open(p) as f:
                runs[name] = json.load(f)
    extra = [n for n in runs if n not in dict(COLUMNS) and n not in ("imagenet", "jaffe")]
    lines = [BEGIN, "_Generated by `experiments/paper_table.py` from the run.json files it "
             "wrote; nothing in this block is typed by hand._", ""]
    head = ["metric (%)", "paper, with TL", "paper, without TL"]
    cols = [(n, lbl) for n, lbl in COLUMNS if n in runs]
    lines += ["| " + " | ".join(head + [lbl for _, lbl in cols]) + " |",
              "|" + "---|" * (len(head) + len(cols))]
    for key, label in (("accuracy", "accuracy"), ("macro_precision", "precision (macro)"),
                       ("macro_recall", "recall (macro)"), ("macro_f1", "F1 (macro)")):
        row = [label, f"{PAPER[key][0]:.2f}", f"{PAPER[key][1]:.2f}"]
        for n, _ in cols:
            m = runs[n]["metrics"]
            row.append(f"{pct(m['cv'][key]['mean'])} ± {pct(m['cv'][key]['std'])}"
                       if "cv" in m else pct(m[key]))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if "imagenet" in runs:
        lines += [f"ImageNet weights (the paper's transfer learning): "
                  f"{runs['imagenet']['status']}", ""]
    lines += ["### Runs", ""]
    for n in [n for n, _ in cols] + extra:
        r = runs[n]
        c, m = r["config"], r["metrics"]
        detail = (f"test images {m['n_test']}, train images {m['n_train']}, test accuracy "
                  f"{pct(m['accuracy'])}" if "n_test" in m
                  else f"{m['n_folds']} folds: accuracy per fold "
                  + ", ".join(pct(v) for v in m["cv"]["accuracy"]["folds"]))
        kw = {k: v for k, v in c.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
        kw["data"] = tuple(kw["data"]) if isinstance(kw["data"], list) else (kw["data"],)
        cli = cli_command(TrainConfig(**kw))
        lines += [f"- **{n}**: `{r['command']}`, i.e. `{cli}`  ",
                  f"  split {c['split']}{' x%d folds' % c['folds'] if c['folds'] else ''}, "
                  f"seed {c['seed']}, lr {c['lr']} ({c['schedule']}), batch {c['batch_size']} "
                  f"per worker x 2 workers, {c['epochs']} epochs, augment {c['augment']}, "
                  f"label smoothing {c['label_smoothing']}, stem {c['stem']}; {detail}; "
                  f"wall time {r['wall_seconds'] / 60:.1f} min "
                  f"({r['train_seconds'] / max(1, c['epochs']):.0f} s per epoch)"]
    curves = [(n, runs[n]["metrics"]["history"]) for n in [n for n, _ in cols] + extra
              if runs[n]["metrics"].get("history")]
    if curves:
        width = max(len(h) for _, h in curves)
        lines += ["", "### Test accuracy (%) after each epoch", "",
                  "| run | " + " | ".join(str(e + 1) for e in range(width)) + " |",
                  "|" + "---|" * (width + 1)]
        for n, h in curves:
            cells = [pct(x["test_acc"]) if x.get("test_acc") is not None else "" for x in h]
            lines.append(f"| {n} | " + " | ".join(cells + [""] * (width - len(cells))) + " |")
    if "jaffe" in runs:
        m = runs["jaffe"]["metrics"]
        lines += ["", "### Cross-dataset: the engineered CK+ model on JAFFE", "",
                  f"`fer-batch evaluate {m['data']} --model {m['model']} --detect-faces`: "
                  f"accuracy {pct(m['accuracy'])}%, macro precision "
                  f"{pct(m['macro_precision'])}%, macro recall {pct(m['macro_recall'])}%, "
                  f"macro F1 {pct(m['macro_f1'])}% on {m['n']} images of the shared classes; "
                  f"left out: {m['excluded_classes']}; model classes absent from JAFFE: "
                  f"{m['missing_classes']}."]
    lines += ["", f"Machine: {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPU cores, torch {torch.__version__}, "
              f"ray {ray.__version__}, no GPU.", END]
    return "\n".join(lines)


def splice(path: str, block: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the begin..end block of path (append it when the markers are missing)."""
    text = open(path).read() if os.path.exists(path) else ""
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "ckplus48"))
    p.add_argument("--jaffe", default=os.path.join(ROOT, "..", "shared", "data", "jaffe"))
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "paper_table"))
    p.add_argument("--runs", default="imagenet,paper,tuned,subject_folds,jaffe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=os.path.join(ROOT, "RESULTS.md"),
                   help="file whose generated block is rewritten (default: RESULTS.md)")
    p.add_argument("--render-only", action="store_true")
    p.add_argument("--record-only", action="store_true", help="write run.json of --runs from "
                   "their metrics.json (after the script itself failed)")
    p.add_argument("--resume-from", default=None, help="Ray Train checkpoint folder of an "
                   "interrupted run (single-split runs only)")
    args = p.parse_args(argv)
    if args.record_only:
        cfgs = configs(args.data, args.out, args.seed)
        for name in args.runs.split(","):
            record(args.out, name, cfgs[name], f"python experiments/paper_table.py --runs {name} "
                   f"--seed {args.seed}")
    elif not args.render_only:
        cfgs = {k: dataclasses.replace(c, resume_from=args.resume_from)
                for k, c in configs(args.data, args.out, args.seed).items()}
        ray.init(num_cpus=2, include_dashboard=False)
        for name in args.runs.split(","):
            if name == "imagenet":
                run_imagenet(args.out)
            elif name == "jaffe":
                run_jaffe(args.out, args.jaffe)
            else:
                run_train(args.out, name, cfgs[name],
                          f"python experiments/paper_table.py --runs {name} --seed {args.seed}"
                          + (f" --resume-from {args.resume_from}" if args.resume_from else ""))
        ray.shutdown()
    splice(args.results, render(args.out))


if __name__ == "__main__":
    main()
