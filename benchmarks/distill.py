"""Probability density distillation (Parallel WaveNet): a MAF teacher into an IAF student.

For each data set a `flows.maf` teacher is fitted by maximum likelihood (Adam, XLA loop,
best weights on a validation split), then a `flows.iaf` student is fitted to the teacher by
`vi.distill` (reverse KL, `min E_q[log q − log p_teacher]`, no annealing). Reported, in one
run: KL(student‖teacher) by Monte Carlo (`vi.kl`, ± one standard error), the test NLL of
teacher and student (the student's exact density is its sequential inverse, one dimension
at a time), and the sampling throughput of each (MAF samples sequentially, IAF in one pass
per layer), both in a `tf.function` without XLA, median of timed calls after a warm-up.

Data sets:
- "toys8" (D = 8): four independent 2-D toys side by side (moons, 8gaussians, pinwheel,
  checkerboard; `tfp_flows.datasets.toy`), 20 000 training and 5 000 test points.
- "digits" (D = 64): `tfp_flows.datasets.digits`, flattened, through the digits benchmarks'
  logit layer `z = logit(0.05 + 0.9·y)` (`digits_quality.logit`); training batches are
  re-dequantized with fresh noise, the teacher and student live on z, NLLs are reported on
  y (logit log-det included) in nats and bits/dim of the 17-level data. KL is the same on
  z and on y (a fixed bijection).

Run: .venv/bin/python benchmarks/distill.py [--quick]   (writes results/distill.md)
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import pathlib
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_probability as tfp  # noqa: E402
import tf_keras  # noqa: E402

from digits_quality import ALPHA, LEVELS, bits_per_dim, logit  # noqa: E402
from tfp_flows import datasets, flows, vi  # noqa: E402

tfd = tfp.distributions

RESULTS = pathlib.Path(__file__).parent / "results" / "distill.md"
TOYS8 = ("moons", "8gaussians", "pinwheel", "checkerboard")
KL_SAMPLES = 50_000
THROUGHPUT_BATCH = 10_000
THROUGHPUT_CALLS = 5


@dataclasses.dataclass
class Setting:
    """One data set's sizes and training budget."""

    hidden_units: tuple[int, ...]
    num_layers: int
    teacher_steps: int
    teacher_batch: int
    teacher_learning_rate: float
    student_steps: int
    student_batch: int
    student_learning_rate: float
    evaluate_every: int = 250


SETTINGS = {
    "toys8": Setting((64, 64), 5, 3000, 256, 1e-3, 3000, 256, 1e-3),
    "digits": Setting((256, 256), 5, 1500, 64, 1e-3, 1500, 256, 3e-4),
}
QUICK = {
    "toys8": Setting((32, 32), 3, 300, 256, 1e-3, 300, 256, 1e-3, 100),
    "digits": Setting((64, 64), 2, 200, 64, 1e-3, 200, 128, 3e-4, 100),
}


def standard_normal(event_size: int) -> tfd.Distribution:
    return tfd.Sample(tfd.Normal(0.0, 1.0), [event_size])


def train_maf_teacher(train_batch, validation: np.ndarray, setting: Setting, seed: int = 0):
    """Fit `flows.maf` by Adam on `−mean log p(x)`; keep the weights best on `validation`.

    `train_batch(step, size)` returns a training batch (a TF function, run inside the XLA
    loop). Every `setting.evaluate_every` steps the validation NLL is computed; the best
    weights are restored at the end. Returns (teacher distribution, seconds).
    """
    event_size = validation.shape[1]
    teacher = tfd.TransformedDistribution(
        standard_normal(event_size),
        flows.maf(event_size, setting.num_layers, setting.hidden_units, seed=seed),
    )
    variables = teacher.trainable_variables
    optimizer = tf_keras.optimizers.Adam(setting.teacher_learning_rate)
    validation = tf.constant(validation, tf.float32)

    @tf.function(jit_compile=True)
    def run(start, steps):
        def body(i):
            with tf.GradientTape() as tape:
                loss = -tf.reduce_mean(teacher.log_prob(train_batch(start + i, setting.teacher_batch)))
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
            return (i + 1,)

        tf.while_loop(lambda i: i < steps, body, (tf.constant(0),))
        return -tf.reduce_mean(teacher.log_prob(validation))

    started = time.perf_counter()
    best = (math.inf, [v.numpy() for v in variables])
    for start in range(0, setting.teacher_steps, setting.evaluate_every):
        validation_nll = float(run(tf.constant(start), tf.constant(setting.evaluate_every)))
        if validation_nll < best[0]:
            best = (validation_nll, [v.numpy() for v in variables])
    for variable, value in zip(variables, best[1]):
        variable.assign(value)
    return teacher, time.perf_counter() - started


def distill_iaf_student(teacher, setting: Setting, seed: int = 1, annealing_steps: int = 0):
    """`vi.distill` of a `flows.iaf` student (same layers and widths as the teacher)."""
    event_size = int(teacher.event_shape[0])
    student = flows.iaf(event_size, setting.num_layers, setting.hidden_units, seed=seed)
    started = time.perf_counter()
    result = vi.distill(
        student, teacher, setting.student_steps, setting.student_batch, seed=seed,
        learning_rate=setting.student_learning_rate, annealing_steps=annealing_steps,
        steps_per_call=min(500, setting.student_steps), verbose=0,
    )
    return result, time.perf_counter() - started


def sampling_throughput(distribution, batch: int = THROUGHPUT_BATCH, calls: int = THROUGHPUT_CALLS) -> float:
    """Samples per second of `distribution.sample(batch)` in a `tf.function` (median over `calls`, after a warm-up).

    Not XLA: TFP's samplers use TF's default stateless RNG, which XLA on CPU runs ~30x slower
    than TF does (see `vi.fit`), and that would dominate both flows' times.
    """
    sample = tf.function(lambda seed: distribution.sample(batch, seed=seed))
    sample(tf.constant([0, 0])).numpy()
    seconds = []
    for call in range(calls):
        started = time.perf_counter()
        sample(tf.constant([0, call + 1])).numpy()
        seconds.append(time.perf_counter() - started)
    return batch / float(np.median(seconds))


def density_seconds(distribution, x: np.ndarray) -> tuple[np.ndarray, float]:
    """`log_prob(x)` in a `tf.function` and its wall time per 1000 points (second call, after tracing)."""
    log_prob = tf.function(distribution.log_prob)
    x = tf.constant(x, tf.float32)
    log_prob(x).numpy()
    started = time.perf_counter()
    values = log_prob(x).numpy().astype(np.float64)
    return values, 1000 * (time.perf_counter() - started) / len(x)


def toys8_data() -> dict:
    def draw(n, seed):
        return np.concatenate([datasets.toy(name, n, seed=seed + k) for k, name in enumerate(TOYS8)], axis=1)

    train = tf.constant(draw(20_000, 0))

    def train_batch(step, size):
        index = tf.random.stateless_uniform([size], tf.stack([11, step]), maxval=train.shape[0], dtype=tf.int32)
        return tf.gather(train, index)

    return dict(train_batch=train_batch, validation=draw(2_000, 100), test=draw(5_000, 200),
                test_log_det=np.zeros(5_000), levels=None)


def digits_data() -> dict:
    train_y = datasets.digits("train").reshape(-1, 64)
    order = np.random.default_rng(0).permutation(len(train_y))
    num_validation = int(round(0.15 * len(train_y)))
    validation_z, _ = logit(train_y[order[:num_validation]])
    levels = tf.constant(np.floor(train_y[order[num_validation:]] * LEVELS), tf.float32)
    test_z, test_log_det = logit(datasets.digits("test").reshape(-1, 64))

    def train_batch(step, size):
        # Fresh dequantization noise for every batch: y = (v + u) / 17, z = logit(0.05 + 0.9·y).
        index = tf.random.stateless_uniform([size], tf.stack([12, step]), maxval=levels.shape[0], dtype=tf.int32)
        noise = tf.random.stateless_uniform([size, 64], tf.stack([13, step]))
        p = ALPHA + (1.0 - 2.0 * ALPHA) * (tf.gather(levels, index) + noise) / LEVELS
        return tf.math.log(p) - tf.math.log1p(-p)

    return dict(train_batch=train_batch, validation=validation_z.astype(np.float32),
                test=test_z.astype(np.float32), test_log_det=test_log_det, levels=LEVELS)


def run_data_set(name: str, setting: Setting, data: dict, anneal_row: bool) -> list[dict]:
    teacher, teacher_seconds = train_maf_teacher(data["train_batch"], data["validation"], setting)
    event_size = data["test"].shape[1]
    teacher_log_prob, teacher_density_ms = density_seconds(teacher, data["test"])
    teacher_throughput = sampling_throughput(teacher)
    untrained = tfd.TransformedDistribution(
        standard_normal(event_size), flows.iaf(event_size, setting.num_layers, setting.hidden_units, seed=1))
    rows = [dict(model="untrained student (N(0, I))", kl=vi.kl(untrained, teacher, KL_SAMPLES, seed=7))]
    rows.append(dict(
        model=f"MAF teacher, {setting.num_layers} × {list(setting.hidden_units)}",
        nll=float(-(teacher_log_prob + data["test_log_det"]).mean()), density_ms=teacher_density_ms,
        throughput=teacher_throughput, seconds=teacher_seconds,
        steps=f"{setting.teacher_steps} × {setting.teacher_batch}",
    ))
    variants = [("IAF student (distilled)", 0)]
    if anneal_row:
        variants.append(("IAF student, β annealed over half the steps", setting.student_steps // 2))
    for label, annealing_steps in variants:
        result, student_seconds = distill_iaf_student(teacher, setting, annealing_steps=annealing_steps)
        student = result.distribution
        student_log_prob, student_density_ms = density_seconds(student, data["test"])
        rows.append(dict(
            model=label, kl=vi.kl(student, teacher, KL_SAMPLES, seed=7),
            nll=float(-(student_log_prob + data["test_log_det"]).mean()), density_ms=student_density_ms,
            throughput=sampling_throughput(student), seconds=student_seconds,
            steps=f"{setting.student_steps} × {setting.student_batch}",
        ))
        print(f"{name}: {label}: KL {rows[-1]['kl'][0]:.4f} ± {rows[-1]['kl'][1]:.4f}", flush=True)
    for row in rows:
        row["data"] = name
        row["bits"] = bits_per_dim(row["nll"], event_size) if data["levels"] and "nll" in row else None
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| data | model | KL(q‖teacher) nats | test NLL (nats) | bits/dim | samples/s | log-density ms / 1000 pts | training | train s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for row in rows:
        kl = f"{row['kl'][0]:.3f} ± {row['kl'][1]:.3f}" if "kl" in row else "-"
        cells = [
            row["data"], row["model"], kl,
            f"{row['nll']:.3f}" if "nll" in row else "-",
            f"{row['bits']:.3f}" if row.get("bits") is not None else "-",
            f"{row['throughput']:,.0f}" if "throughput" in row else "-",
            f"{row['density_ms']:.3f}" if "density_ms" in row else "-",
            row.get("steps", "-"), f"{row['seconds']:.0f}" if "seconds" in row else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for name in dict.fromkeys(row["data"] for row in rows):
        teacher = next(r for r in rows if r["data"] == name and r["model"].startswith("MAF"))
        student = next(r for r in rows if r["data"] == name and r["model"] == "IAF student (distilled)")
        lines.append("")
        lines.append(
            f"{name}: student samples {student['throughput'] / teacher['throughput']:.1f}× faster than the "
            f"teacher; its exact log-density takes {student['density_ms'] / teacher['density_ms']:.1f}× the teacher's."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny flows and few steps (a smoke run, not the table)")
    parser.add_argument("--only", choices=("toys8", "digits"), help="run one data set")
    args = parser.parse_args()
    settings = QUICK if args.quick else SETTINGS
    started = time.perf_counter()
    rows = []
    for name, load in (("toys8", toys8_data), ("digits", digits_data)):
        if args.only in (None, name):
            rows += run_data_set(name, settings[name], load(), anneal_row=name == "toys8")
    minutes = (time.perf_counter() - started) / 60
    body = table(rows)
    header = (
        f"# Distillation: MAF teacher → IAF student\n\n{datetime.date.today().isoformat()}, 2 CPU cores, "
        f"no GPU ({platform.processor() or platform.machine()}; TF {tf.__version__}, TFP {tfp.__version__}); "
        f"this run took {minutes:.1f} min{' (--quick)' if args.quick else ''}. KL by Monte Carlo over "
        f"{KL_SAMPLES} student samples; sampling: batches of {THROUGHPUT_BATCH}, tf.function without XLA, median of "
        f"{THROUGHPUT_CALLS} calls. Student: `vi.distill`, Adam, no annealing unless stated; teacher: "
        "Adam on the NLL, best of every 250 steps on a validation split.\n\n"
    )
    print(body)
    if not args.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(header + body + "\n")


if __name__ == "__main__":
    main()
