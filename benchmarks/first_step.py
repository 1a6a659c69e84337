"""Time to the first training step: this checkout against an older commit, in one run.

    python benchmarks/first_step.py [--old 4e1da99] [--rounds 3]

Three workloads, each in a fresh Python process (so imports, tracing and XLA
compilation all count), the two code trees alternating round by round:

- `cli`: `tfp-flows fit --data 8gaussians --flow planar --layers 32 --epochs 1`,
  from the process start to the end of the first training step;
- `fit MAF`: `FlowModel(flows.maf(8, 5, [64, 64])).fit(x, batch_size=512)` and
- `fit Glow`: `FlowModel(flows.glow([16, 16, 3], 2, 4, 64)).fit(x, batch_size=32)`,
  from the call of `fit` to the end of the first training step.

"End of the first step" is the first `on_train_batch_end` of Keras' callback list,
patched in by the probe: with `steps_per_execution > 1` Keras calls it after the
first compiled execution, so the figure then includes that execution's other
steps (milliseconds; it cannot favour the newer tree by more than that). The
older tree is exported with `git archive` into a temporary folder and put first
on `PYTHONPATH`; both run in this interpreter's environment.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

from report import publish

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = r"""
import os, sys, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tf_keras
def _first(self, batch, logs=None):
    print("FIRST_STEP_END", time.time(), flush=True)
    os._exit(0)
tf_keras.callbacks.CallbackList.on_train_batch_end = _first
workload = sys.argv[1]
if workload == "cli":
    from tfp_flows.cli import main
    main(["fit", "--data", "8gaussians", "--flow", "planar", "--layers", "32", "--epochs", "1",
          "--out", sys.argv[2], "--quiet"])
else:
    import numpy as np
    from tfp_flows import FlowModel, flows
    rng = np.random.default_rng(0)
    if workload == "maf":
        flow, shape, batch = flows.maf(8, num_layers=5, hidden_units=[64, 64]), [8], 512
    else:
        flow, shape, batch = flows.glow([16, 16, 3], 2, 4, 64, seed=0), [16, 16, 3], 32
    x = rng.normal(size=[8 * batch] + shape).astype(np.float32)
    model = FlowModel(flow, shape)
    model.compile()
    print("FIT_START", time.time(), flush=True)
    model.fit(x, epochs=1, batch_size=batch, verbose=0)
"""


def export_tree(commit: str) -> str:
    folder = tempfile.mkdtemp(prefix=f"tfp_flows_{commit}_")
    archive = subprocess.run(["git", "-C", REPO, "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    return folder


def seconds_to_first_step(tree: str, workload: str) -> float:
    out = tempfile.mkdtemp(prefix="first_step_run_")
    env = dict(os.environ, PYTHONPATH=tree, TF_CPP_MIN_LOG_LEVEL="3")
    start = time.time()
    result = subprocess.run([sys.executable, "-c", PROBE, workload, os.path.join(out, "run")],
                            cwd=out, env=env, capture_output=True, text=True, timeout=1800)
    marks = dict(line.split()[:2] for line in result.stdout.splitlines()
                 if line.startswith(("FIT_START", "FIRST_STEP_END")))
    if "FIRST_STEP_END" not in marks:
        raise RuntimeError(f"{workload} in {tree} never finished a step:\n{result.stderr[-3000:]}")
    began = float(marks.get("FIT_START", start))
    return float(marks["FIRST_STEP_END"]) - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default="4e1da99", help="the commit to compare against")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", default="cli,maf,glow")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "first_step.md"))
    args = parser.parse_args()
    new = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], check=True,
                         capture_output=True, text=True).stdout.strip()
    trees = {f"old ({args.old})": export_tree(args.old), f"new ({new} + working tree)": REPO}
    names = {"cli": "`tfp-flows fit` planar 32, process start to first step",
             "maf": "`FlowModel.fit` MAF D=8, 5 x [64, 64], batch 512, fit call to first step",
             "glow": "`FlowModel.fit` Glow 16x16x3, 2 x 4, hidden 64, batch 32, fit call to first step"}
    seconds = {(w, t): [] for w in args.workloads.split(",") for t in trees}
    for _ in range(args.rounds):
        for workload in args.workloads.split(","):
            for label, tree in trees.items():
                seconds[workload, label].append(seconds_to_first_step(tree, workload))
                print(workload, label, f"{seconds[workload, label][-1]:.1f} s", flush=True)
    old, new_label = list(trees)
    lines = [f"Time to the first training step, {datetime.date.today()}, {os.cpu_count()} CPU cores "
             f"({platform.machine()}), no GPU; fresh process per run, trees alternating, "
             f"{args.rounds} rounds (median, and every run in brackets).", "",
             f"| workload | {old} s | {new_label} s | new / old |", "| --- | ---: | ---: | ---: |"]
    for workload in args.workloads.split(","):
        a, b = seconds[workload, old], seconds[workload, new_label]
        lines.append(f"| {names[workload]} | {np.median(a):.1f} ({', '.join(f'{v:.1f}' for v in a)}) | "
                     f"{np.median(b):.1f} ({', '.join(f'{v:.1f}' for v in b)}) | "
                     f"{np.median(b) / np.median(a):.2f}x |")
    publish(lines, args.out)


if __name__ == "__main__":
    main()
