"""The torch-level code (model, infer, calibrate, detect_torch's network, the training step)
imports and runs where Ray and PyAV are absent: a lent GPU machine has neither. Checked in a
fresh interpreter in which importing `ray` or `av` fails."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BLOCKED = textwrap.dedent("""
    import importlib.abc, sys
    class Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("ray", "av"):
                raise ImportError(f"{name} is absent on this machine")
    sys.meta_path.insert(0, Blocked())
""")


def run_without_ray_and_av(body: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKED + textwrap.dedent(body)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


def test_the_blocker_blocks():
    res = run_without_ray_and_av("import ray")
    assert res.returncode != 0 and "absent on this machine" in res.stderr


def test_torch_level_modules_import_and_run_without_ray_and_av():
    res = run_without_ray_and_av("""
        import numpy as np, torch
        from fer_batch import calibrate, detect_torch, infer, model, train_loop
        from fer_batch.config import TrainConfig
        net, meta = model.load_checkpoint("default")  # the checks, the weights, the id
        faces = np.random.default_rng(0).integers(0, 256, (8, 1, 48, 48), dtype=np.uint8)
        probs = infer.predict(net, faces, temperature=infer.temperature_of(meta))
        assert probs.shape == (8, len(meta["classes"]))
        cfg = TrainConfig(batch_size=4, augment=True, lr=1e-4)
        net = net.train()
        opt = train_loop.build_optimizer(net, cfg)
        loss, correct = train_loop.train_epoch(
            net, opt, torch.from_numpy(faces), torch.zeros(8, dtype=torch.long),
            np.arange(8), cfg=cfg, epoch=0, total=2, device=torch.device("cpu"), bf16=False,
            weight=None, rng=np.random.default_rng(0), on_step=lambda s, n: None)
        assert loss > 0
        assert detect_torch.CenterFaceBatch  # the pool's network class, importable
        print("fine")
    """)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "fine" in res.stdout


@pytest.mark.slow  # trains for seconds in a subprocess
def test_the_prepared_gpu_command_runs_on_the_cpu_without_ray_and_av(tmp_path):
    """bench/gpu.py --smoke: the device command's code, tiny sizes, on this CPU, where Ray
    and PyAV cannot be imported (the GPU machine has neither). Every part writes its file,
    none fails, and the trained model's parts rejoin into a checkpoint fer-batch loads."""
    import json
    out = tmp_path / "out"
    res = run_without_ray_and_av(f"""
        import runpy, sys
        sys.argv = ["bench/gpu.py", "--smoke", "--out", {str(out)!r},
                    "--archive", {str(tmp_path / "none.npz")!r}]
        try:
            runpy.run_path("bench/gpu.py", run_name="__main__")
        except SystemExit as e:
            assert not e.code, e.code
    """)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("env.json", "infer.json", "detect.json", "agree.json", "train.json"):
        part = json.loads((out / name).read_text())
        assert "error" not in part, (name, part.get("traceback", part)[-2000:])
    env = json.loads((out / "env.json").read_text())
    assert env["ray"].startswith("absent") and env["av"].startswith("absent")
    assert json.loads((out / "agree.json").read_text())["same_label"] == 1.0
    trained = json.loads((out / "train.json").read_text())
    assert trained["epochs"] >= 1 and trained["parts"]
    detect = json.loads((out / "detect.json").read_text())
    assert "skipped" in detect or detect["boxes_agree"], detect
    joined = subprocess.run([sys.executable, "bench/gpu.py", "--join", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert joined.returncode == 0, joined.stderr[-2000:]
    from fer_batch.model import load_checkpoint
    _, meta = load_checkpoint(str(out / "model.pt"))
    assert meta["model_id"] == trained["model_id"]
