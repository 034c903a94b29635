"""ResNet-50 training step at 48x48 on this machine's CPU: fp32 vs bf16 autocast, and the
cost of torch.set_num_threads called from a thread other than the main one (Ray Train runs
the training function in such a thread).

    .venv/bin/python bench/train_step.py            # each setting in a fresh process

Prints ms per step (batch 64, AdamW, label smoothing; 2 warm-up steps, then 10 timed).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

SETTINGS = {  # name -> (bf16 autocast, run in a thread, call set_num_threads there)
    "fp32, main thread": (False, False, False),
    "bf16 autocast, main thread": (True, False, False),
    "bf16 autocast, other thread": (True, True, False),
    "bf16 autocast, other thread, set_num_threads(2) there": (True, True, True),
}
BATCH, WARMUP, TIMED = 64, 2, 10


def step_ms(bf16: bool, in_thread: bool, set_threads: bool) -> float:
    import torch
    import torch.nn.functional as F

    from fer_batch.model import build_model
    out = {}

    def body():
        if set_threads:
            torch.set_num_threads(2)
        net = build_model(7, 1).to(memory_format=torch.channels_last).train()
        opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=0.05, fused=True)
        x = torch.randint(0, 255, (BATCH, 1, 48, 48), dtype=torch.uint8)
        y = torch.randint(0, 7, (BATCH,))
        for i in range(WARMUP + TIMED):
            if i == WARMUP:
                t0 = time.perf_counter()
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                logits = net(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
        out["ms"] = (time.perf_counter() - t0) / TIMED * 1000

    if in_thread:
        t = threading.Thread(target=body)
        t.start()
        t.join()
    else:
        body()
    return out["ms"]


def main() -> None:
    if len(sys.argv) == 2:  # child: one setting
        print(f"{step_ms(*SETTINGS[sys.argv[1]]):.0f}")
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    print(f"| setting | ms per step (batch {BATCH}) |\n|---|---|")
    for name in SETTINGS:
        ms = subprocess.run([sys.executable, __file__, name], env=env, capture_output=True,
                            text=True, timeout=900).stdout.strip()
        print(f"| {name} | {ms} |", flush=True)


if __name__ == "__main__":
    main()
