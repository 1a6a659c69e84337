import glob
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tfp_flows import cli, datasets
from tfp_flows.plotting import plot_density_2d, plot_image_grid

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(8) == PNG_SIGNATURE


# ---------------------------------------------------------------- plotting

def test_plot_density_2d_writes_a_png(tmp_path):
    data = datasets.toy("8gaussians", 500, seed=0)
    samples = datasets.toy("8gaussians", 500, seed=1)
    path = str(tmp_path / "sub" / "density.png")
    returned = plot_density_2d(lambda x: datasets.toy_log_prob("8gaussians", x), data, samples, path,
                               grid_size=50)
    assert returned == path and _is_png(path)
    from matplotlib.image import imread

    height, width = imread(path).shape[:2]
    assert width > 2.5 * height  # three panels side by side


def test_plot_density_2d_accepts_a_distribution(tmp_path):
    import tensorflow_probability as tfp

    normal = tfp.distributions.MultivariateNormalDiag(loc=[0.0, 0.0])
    data = np.random.default_rng(0).standard_normal((200, 2))
    path = plot_density_2d(normal, data, data, str(tmp_path / "normal.png"), bounds=(-3, 3, -3, 3), grid_size=30)
    assert _is_png(path)


def test_plot_image_grid(tmp_path):
    path = plot_image_grid(datasets.digits("test")[:10], str(tmp_path / "digits.png"), nrow=5)
    assert _is_png(path)


def test_plotting_rejects_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match=r"\[N, H, W, C\].*\[10, 8, 8\]"):
        plot_image_grid(np.zeros((10, 8, 8)), str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match=r"data must have shape \[N, 2\].*\[5, 3\]"):
        plot_density_2d(lambda x: np.zeros(len(x)), np.zeros((5, 3)), np.zeros((5, 2)), str(tmp_path / "y.png"))
    with pytest.raises(TypeError, match="log_prob"):
        plot_density_2d(3.0, np.zeros((5, 2)), np.zeros((5, 2)), str(tmp_path / "z.png"))


# ---------------------------------------------------------------- command line: in process

def _exit_status(argv) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exit_info:
        return exit_info.code


def test_help_exits_zero_and_explains_every_flag(capsys):
    assert _exit_status(["fit", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ["--data", "--flow", "--layers", "--hidden", "--epochs", "--batch-size", "--lr", "--patience",
                 "--validation-split", "--n", "--n-test", "--test-fraction", "--seed", "--out", "--no-jit",
                 "--plot-samples", "--quiet", "--resume", "SIGINT", "tensorboard"]:
        assert flag in text, flag
    assert _exit_status(["--help"]) == 0
    assert "fit" in capsys.readouterr().out


def test_no_arguments_means_the_default_fit():
    args = cli.build_parser().parse_args(["fit"])
    assert (args.data, args.flow, args.hidden) == ("8gaussians", "planar", [64, 64])
    assert args.out == os.path.abspath(os.path.join("runs", "default"))


@pytest.mark.parametrize("flow", sorted(cli.FLOW_BUILDERS))
def test_every_flow_name_builds_an_invertible_flow_of_the_requested_depth(flow):
    args = cli.build_parser().parse_args(["fit", "--flow", flow, "--layers", "3", "--hidden", "8"])
    bijector = cli._build_bijector(args, event_size=2)
    x = tf.constant(datasets.toy("moons", 16, seed=0))
    np.testing.assert_allclose(bijector.forward(bijector.inverse(x)).numpy(), x.numpy(), atol=1e-4)
    assert len(bijector.trainable_variables) >= 3


def test_divergence_rule():
    # An epoch above the first by more than max(10 nats, 50 % of |first|).
    assert not cli.diverged([])
    assert not cli.diverged([5.0, 15.0, 4.0])                  # exactly +10: not more
    assert cli.diverged([5.0, 15.01])
    assert not cli.diverged([100.0, 150.0]) and cli.diverged([100.0, 150.1])   # 50 % of 100
    assert not cli.diverged([-40.0, -20.0]) and cli.diverged([-40.0, -19.9])   # 50 % of |-40|
    assert not cli.diverged([3.0, 2.0, 1.0])


def test_a_resumed_run_gets_the_batches_of_the_uninterrupted_run_bitwise():
    x = np.arange(50 * 2, dtype=np.float32).reshape(50, 2)
    whole = [batch for batch in cli._epoch_batches(x, 8, 3, 0, 4).as_numpy_iterator()]
    assert len(whole) == 4 * 6 and all(batch.shape == (8, 2) for batch in whole)
    for first_epoch in (1, 3):
        tail = list(cli._epoch_batches(x, 8, 3, first_epoch, 4).as_numpy_iterator())
        assert len(tail) == (4 - first_epoch) * 6
        for got, expected in zip(tail, whole[first_epoch * 6:]):
            np.testing.assert_array_equal(got, expected)
    epochs = [np.concatenate(whole[6 * e : 6 * e + 6])[:, 0] for e in range(4)]
    for rows in epochs:  # each epoch: 48 distinct rows of the 50, in a new order
        assert len(set(rows.tolist())) == 48 and set(rows.tolist()) <= set(x[:, 0].tolist())
    assert len({tuple(rows.tolist()) for rows in epochs}) == 4
    other_seed = np.concatenate(list(cli._epoch_batches(x, 8, 4, 0, 1).as_numpy_iterator()))[:, 0]
    assert other_seed.tolist() != epochs[0].tolist()


def _files(folder) -> set[str]:
    return {os.path.relpath(os.path.join(root, name), folder)
            for root, _, names in os.walk(folder) for name in names}


def test_fit_on_toy_data_writes_all_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    # Without XLA to keep the test short (the compiled path runs in the .npy test below).
    assert cli.main(["fit", "--data", "8gaussians", "--flow", "planar", "--layers", "2", "--epochs", "4",
                     "--batch-size", "64", "--n", "1000", "--n-test", "1000", "--lr", "0.02", "--no-jit",
                     "--plot-samples", "500", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "diverged" not in printed
    assert _is_png(out / "density.png")
    metrics = json.loads((out / "metrics.json").read_text())
    run = json.loads((out / "run.json").read_text())
    # Exactly one run's files, listed in metrics.json under the run id of run.json.
    assert _files(out) == set(metrics["files"]) and metrics["run_id"] == run["run_id"]
    assert {"checkpoints/best.index", "checkpoints/training/checkpoint", "saved_model/saved_model.pb",
            "density.png", "run.json"} <= set(metrics["files"])
    assert os.listdir(tmp_path) == ["run"]  # the temporary folder became the output
    for key in ["train_nll", "test_nll", "train_bits_per_dim", "test_bits_per_dim", "fit_seconds", "wall_seconds"]:
        assert math.isfinite(metrics[key]), key
    assert metrics["epochs_run"] == 4 == len(metrics["history"]) and metrics["arguments"]["layers"] == 2
    assert metrics["interrupted"] is False and metrics["signal"] is None
    assert metrics["diverged"] == cli.diverged([entry["nll"] for entry in metrics["history"]]) is False
    np.testing.assert_allclose(metrics["test_bits_per_dim"], metrics["test_nll"] / (2 * math.log(2)))
    best = min(metrics["history"], key=lambda entry: entry["val_nll"])
    assert (metrics["best_epoch"], metrics["best_validation_nll"]) == (best["epoch"], best["val_nll"])
    # The trained flow beats the untrained base distribution on held-out data.
    assert metrics["test_nll"] < metrics["standard_normal_test_nll"] - 0.1
    # ... and cannot beat the true density by more than sampling noise.
    assert metrics["test_kl_estimate"] > -0.05
    # The exported model carries the reported (best-checkpoint) weights.
    test = datasets.toy("8gaussians", 1000, seed=1)
    exported = tf.saved_model.load(str(out / "saved_model"))
    np.testing.assert_allclose(-np.mean(exported.log_prob(test).numpy()), metrics["test_nll"], rtol=1e-4)


def test_fit_on_a_npy_file_without_a_plot(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1500, 3)) @ np.array([[3.0, 0.0, 0.0], [1.0, 0.5, 0.0], [0.0, 2.0, 0.2]]) + 2.0
    path = tmp_path / "data.npy"
    np.save(path, x.astype(np.float32))
    out = tmp_path / "run3d"
    assert cli.main(["fit", "--data", str(path), "--flow", "maf", "--layers", "2", "--hidden", "16",
                     "--epochs", "3", "--patience", "2", "--lr", "0.01", "--out", str(out), "--quiet"]) == 0
    assert "skipping density.png" in capsys.readouterr().out
    assert not (out / "density.png").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["event_size"] == 3 and metrics["num_test"] == 300 and metrics["num_train"] == 1200
    assert metrics["num_validation"] == 120
    assert metrics["test_nll"] < metrics["standard_normal_test_nll"] - 1.0
    assert (out / "saved_model" / "saved_model.pb").exists()


def test_the_documented_minimum_of_ten_rows_trains(tmp_path):
    path = tmp_path / "ten.npy"
    np.save(path, np.random.default_rng(1).standard_normal((10, 2)).astype(np.float32))
    out = tmp_path / "ten"
    assert cli.main(["fit", "--data", str(path), "--layers", "1", "--epochs", "2", "--no-jit", "--quiet",
                     "--plot-samples", "50", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # 2 test rows (0.2 of 10), 1 validation row (0.1 of 8, at least one), 7 to train on.
    assert (metrics["num_test"], metrics["num_validation"], metrics["num_train"]) == (2, 1, 8)
    assert metrics["epochs_run"] == 2


def _npy(tmp_path, name, array) -> str:
    path = str(tmp_path / name)
    np.save(path, array)
    return path


def _usage_cases(tmp_path) -> list[tuple[list[str], str]]:
    rng = np.random.default_rng(0)
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "text.npy").write_text("1,2\n3,4\n")
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("someone's files")
    constant = rng.standard_normal((50, 3))
    constant[:, 1] = 0.5
    with_nan = rng.standard_normal((50, 2))
    with_nan[7, 1] = np.nan
    return [
        (["--seed", "-1"], "--seed: expected an integer in [0, 2147483647]; given '-1'"),
        (["--seed", "2147483648"], "--seed: expected an integer in [0, 2147483647]; given '2147483648'"),
        (["--seed", "1.5"], "--seed: expected an integer in [0, 2147483647]; given '1.5'"),
        (["--layers", "0"], "--layers: expected a positive integer; given '0'"),
        (["--epochs", "-3"], "--epochs: expected a positive integer; given '-3'"),
        (["--batch-size", "1.5"], "--batch-size: expected a positive integer; given '1.5'"),
        (["--n", "0"], "--n: expected a positive integer; given '0'"),
        (["--n", "1"], "--n: expected at least 2 points"),
        (["--n-test", "x"], "--n-test: expected a positive integer; given 'x'"),
        (["--patience", "0"], "--patience: expected a positive integer; given '0'"),
        (["--plot-samples", "0"], "--plot-samples: expected a positive integer; given '0'"),
        (["--lr", "-1"], "--lr: expected a finite number > 0; given '-1'"),
        (["--lr", "nan"], "--lr: expected a finite number > 0; given 'nan'"),
        (["--lr", "inf"], "--lr: expected a finite number > 0; given 'inf'"),
        (["--validation-split", "0"], "--validation-split: expected a number in (0, 1); given '0'"),
        (["--test-fraction", "1"], "--test-fraction: expected a number in (0, 1); given '1'"),
        (["--hidden", ""], "--hidden: expected a comma-separated list of positive integers such as 64,64; given ''"),
        (["--hidden", "64,x"], "--hidden: expected a comma-separated list of positive integers"),
        (["--hidden", "64,0"], "--hidden: expected a comma-separated list of positive integers"),
        (["--flow", "spline"], "--flow: expected one of planar, radial, maf, iaf"),
        (["--data", "swissroll"], "--data: expected one of moons, 8gaussians"),
        (["--data", str(tmp_path / "missing.npy")], "--data: expected an existing .npy file; given"),
        (["--out", str(tmp_path / "a_file")], "--out: expected a folder, new or from an earlier run; given"),
        (["--out", str(tmp_path / "a_file" / "sub")], "--out: expected a path whose parent folders are folders"),
        (["--out", str(tmp_path / "other")], "(a folder holding other files)"),
        (["--data", str(tmp_path / "empty.npy")], "expected a .npy file of a float array [N, D]; given a file NumPy cannot read"),
        (["--data", str(tmp_path / "text.npy")], "given a file NumPy cannot read"),
        (["--data", _npy(tmp_path, "int.npy", np.ones((50, 2), np.int64))], "expected a float array [N, D]; given dtype int64"),
        (["--data", _npy(tmp_path, "complex.npy", np.ones((50, 2), np.complex64))], "given dtype complex64"),
        (["--data", _npy(tmp_path, "flat.npy", np.ones(50, np.float32))], "expected a float array [N, D]; given shape [50]"),
        (["--data", _npy(tmp_path, "cube.npy", np.ones((5, 4, 3), np.float32))], "given shape [5, 4, 3]"),
        (["--data", _npy(tmp_path, "none.npy", np.ones((0, 2), np.float32))], "expected at least 10 rows"),
        (["--data", _npy(tmp_path, "nine.npy", rng.standard_normal((9, 2)))], "; given 9 rows"),
        (["--data", _npy(tmp_path, "ten.npy", rng.standard_normal((10, 2))), "--test-fraction", "0.9"],
         "the 9 test row(s) of --test-fraction 0.9 and the 1 validation row(s)"),
        (["--data", _npy(tmp_path, "nan.npy", with_nan)], "expected finite values; given 1 NaN/inf value(s), the first at row"),
        (["--data", _npy(tmp_path, "huge.npy", np.full((50, 2), 1e30))], "standardise the data); given max |x| = 1e+30"),
        (["--data", _npy(tmp_path, "constant.npy", constant)],
         "expected no constant column (its density is a point mass, the likelihood grows without bound); "
         "given column 1 equal to 0.5 in all"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["--resume", str(tmp_path / "no_such_run")], "--resume: expected the --out of an unfinished run"),
        (["--resume", str(tmp_path / "no_such_run"), "--epochs", "3"], "--resume: expected no other flag than --quiet"),
    ]


def test_every_usage_error_is_one_line_exit_2_before_any_work(tmp_path, capsys):
    cases = _usage_cases(tmp_path)
    before = _files(tmp_path)
    for arguments, message in cases:
        # Valid defaults elsewhere; a run that got past the checks would write into `never`.
        argv = ["fit", *arguments] + ([] if "--out" in arguments or "--resume" in arguments
                                      else ["--out", str(tmp_path / "never")])
        assert _exit_status(argv) == 2, arguments
        captured = capsys.readouterr()
        lines = captured.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("tfp-flows: error: "), (arguments, captured.err)
        assert message in lines[0], (arguments, lines[0])
        assert captured.out == "", arguments
    assert _files(tmp_path) == before  # nothing written, no temporary folder


def test_resume_finds_the_one_unfinished_run(tmp_path):
    def make_run(name, status):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "run.json").write_text(json.dumps({"run_id": name, "status": status}))
        return str(tmp_path / name)

    first = make_run(".out.tmp-a", "running")
    make_run(".other.tmp-c", "running")  # another --out's run
    assert cli._resume_target(str(tmp_path / "out"))[0] == first
    assert cli._resume_target(first) == (first, {"run_id": ".out.tmp-a", "status": "running"})
    second = make_run(".out.tmp-b", "running")
    with pytest.raises(cli.UsageError, match=r"expected one unfinished run; given .* with 2: .*tmp-a, .*tmp-b"):
        cli._resume_target(str(tmp_path / "out"))
    assert cli._resume_target(second)[0] == second  # named explicitly
    failed = make_run(".done.tmp-d", "failed")
    with pytest.raises(cli.UsageError, match="stopped on a non-finite NLL"):
        cli._resume_target(failed)
    with pytest.raises(cli.UsageError, match=r"\(no run, and no unfinished run beside it\)"):
        cli._resume_target(str(tmp_path / "nothing"))


def test_fit_flags_work_without_the_word_fit(tmp_path, capsys):
    assert _exit_status(["--flow", "spline", "--out", str(tmp_path / "never")]) == 2
    assert capsys.readouterr().err == (
        "tfp-flows: error: --flow: expected one of planar, radial, maf, iaf, nice, realnvp; given 'spline'\n")


# ---------------------------------------------------------------- command line: real processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(cli.__file__)))
# Radial: its closed-form inverse traces in a fraction of the time of planar's root solve
# (about 18 s against 24 s a process); the in-process tests above run planar and maf.
TINY = ["--flow", "radial", "--layers", "2", "--n", "400", "--n-test", "200", "--batch-size", "32",
        "--lr", "0.02", "--no-jit", "--quiet", "--plot-samples", "200"]


def _start(*arguments) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.Popen([sys.executable, "-m", "tfp_flows.cli", "fit", *arguments], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# TensorFlow's C++ start-up lines ("WARNING: All log messages before absl::InitializeLog() ...",
# "I0000 00:00:... cudart_stub.cc ..."), printed while importing it, are not the command's.
_TF_STARTUP = re.compile(r"^(WARNING: All log messages before absl::InitializeLog|[IWEF]\d{4} )")


def _finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    """Exit status, stdout and stderr (without TensorFlow's start-up lines)."""
    out, err = process.communicate(timeout=timeout)
    err = "".join(line for line in err.splitlines(keepends=True) if not _TF_STARTUP.match(line))
    return process.returncode, out, err


def _wait_for(pattern: str, process: subprocess.Popen, timeout: float = 300) -> str:
    """The first path matching `pattern`, polled while `process` runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = glob.glob(pattern, include_hidden=True)
        if found:
            return found[0]
        if process.poll() is not None:
            raise AssertionError(f"the run ended (status {process.returncode}) before {pattern} "
                                 f"appeared: {process.communicate()}")
        time.sleep(0.01)
    process.kill()
    raise AssertionError(f"{pattern} did not appear within {timeout} s")


def _checkpoint_values(prefix: str) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(prefix)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if not name.startswith("_CHECKPOINTABLE_OBJECT_GRAPH")}


def _tensorboard_scalars(folder: str) -> dict[str, dict[int, float]]:
    scalars: dict[str, dict[int, float]] = {}
    for path in glob.glob(os.path.join(folder, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                number = float(tf.make_ndarray(value.tensor)) if value.HasField("tensor") else value.simple_value
                scalars.setdefault(value.tag, {})[int(event.step)] = number
    return scalars


def _assert_one_complete_run(out) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    assert _files(out) == set(metrics["files"])
    assert json.loads((out / "run.json").read_text())["run_id"] == metrics["run_id"]
    assert not any("variables_temp" in name for name in metrics["files"])
    return metrics


def test_kill_and_resume_ends_where_an_uninterrupted_run_ends(tmp_path, capsys):
    """A run killed (SIGKILL) into the --out of an earlier run leaves that run intact;
    --resume then finishes it with the weights and metrics of an uninterrupted run."""
    out = tmp_path / "out"
    arguments = [*TINY, "--epochs", "6", "--out", str(out)]
    status, printed, errors = _finish(_start(*arguments))
    assert status == 0 and "Traceback" not in errors, errors
    first = _assert_one_complete_run(out)
    first_best = _checkpoint_values(str(out / "checkpoints" / "best"))
    first_last = _checkpoint_values(str(out / "checkpoints" / "training" / "ckpt-6"))
    # TensorBoard: one event per epoch for every logged quantity, equal to the history.
    for split, prefix in (("train", ""), ("validation", "val_")):
        scalars = _tensorboard_scalars(str(out / "tensorboard" / split))
        logged = [key[len(prefix):] for key in first["history"][0]
                  if key != "epoch" and key.startswith("val_") == (split == "validation")]
        assert "nll" in logged
        for key in logged:
            assert scalars["epoch_" + key] == pytest.approx(
                {entry["epoch"] - 1: entry[prefix + key] for entry in first["history"]}, rel=1e-6), key

    # The same arguments again, into the same --out: killed after its first epoch-end checkpoint.
    second = _start(*arguments)
    state = _wait_for(str(tmp_path / ".out.tmp-*" / "checkpoints" / "training" / "checkpoint"), second)
    second.send_signal(signal.SIGKILL)
    assert _finish(second)[0] == -signal.SIGKILL
    temp = os.path.dirname(os.path.dirname(os.path.dirname(state)))
    killed_at = int(tf.train.get_checkpoint_state(os.path.dirname(state)).model_checkpoint_path.rsplit("-", 1)[1])
    assert 1 <= killed_at < 6
    assert sorted(os.listdir(tmp_path)) == sorted(["out", os.path.basename(temp)])
    # The earlier run is untouched and consistent.
    assert _assert_one_complete_run(out) == first
    second_id = json.loads(open(os.path.join(temp, "run.json")).read())["run_id"]
    assert second_id != first["run_id"] and not os.path.exists(os.path.join(temp, "metrics.json"))

    status, printed, errors = _finish(_start("--resume", str(out), "--quiet"))
    assert status == 0 and "Traceback" not in errors, errors
    assert f"run {second_id} resumed" in printed
    assert os.listdir(tmp_path) == ["out"]
    resumed = _assert_one_complete_run(out)
    assert resumed["run_id"] == second_id and resumed["resumed"] is True
    # Same batches, weights, Adam state and epoch: the numbers of the uninterrupted run. Equal
    # to TensorFlow's run-to-run rounding only: two uninterrupted runs of these arguments, in
    # fresh processes, differ in the last bits about one time in ten (measured 1 of 23; the
    # op-determinism switch, oneDNN off and one intra-op thread each still left 1 of 24
    # 20-epoch runs different). A lost Adam state or a repeated epoch moves them by ≫ 1e-5.
    for key in ["best_epoch", "epochs_run", "diverged"]:
        assert resumed[key] == first[key], key
    for key in ["train_nll", "test_nll", "best_validation_nll"]:
        assert resumed[key] == pytest.approx(first[key], rel=1e-5), key
    assert [sorted(entry) for entry in resumed["history"]] == [sorted(entry) for entry in first["history"]]
    for entry, reference in zip(resumed["history"], first["history"]):
        assert entry == pytest.approx(reference, rel=1e-5)
    for values, reference in ((_checkpoint_values(str(out / "checkpoints" / "best")), first_best),
                              (_checkpoint_values(str(out / "checkpoints" / "training" / "ckpt-6")), first_last)):
        assert values.keys() == reference.keys()
        for name in reference:
            if isinstance(reference[name], bytes):  # the history, as JSON
                saved, expected = json.loads(values[name]), json.loads(reference[name])
                assert len(saved) == len(expected) and all(
                    a == pytest.approx(b, rel=1e-5) for a, b in zip(saved, expected)), name
            elif reference[name].dtype.kind in "iub":
                np.testing.assert_array_equal(values[name], reference[name], err_msg=name)
            else:
                np.testing.assert_allclose(values[name], reference[name], rtol=1e-5, atol=1e-9, err_msg=name)
    iterations = [name for name in first_last if "optimizer" in name and "iter" in name]
    assert iterations and first_last[iterations[0]] == 6 * (360 // 32)  # Adam's state is in it, counted

    # Resuming a finished run is a usage error.
    assert _exit_status(["fit", "--resume", str(out)]) == 2
    errors = capsys.readouterr().err
    assert errors.startswith("tfp-flows: error: --resume: ") and "(a finished run" in errors
    assert len(errors.splitlines()) == 1


def test_sigint_stops_after_the_batch_and_writes_the_best_weights(tmp_path):
    out = tmp_path / "out"
    process = _start(*TINY, "--epochs", "500", "--out", str(out))
    _wait_for(str(tmp_path / ".out.tmp-*" / "checkpoints" / "training" / "checkpoint"), process)
    process.send_signal(signal.SIGINT)
    status, printed, errors = _finish(process)
    assert status == 130 and "Traceback" not in errors and "KeyboardInterrupt" not in errors, errors
    assert "SIGINT: stopping after the current batch" in errors
    assert os.listdir(tmp_path) == ["out"]
    metrics = _assert_one_complete_run(out)
    assert metrics["interrupted"] is True and metrics["signal"] == "SIGINT"
    assert 1 <= metrics["epochs_run"] < 500
    assert metrics["best_validation_nll"] == min(entry["val_nll"] for entry in metrics["history"])
    exported = tf.saved_model.load(str(out / "saved_model"))
    test = datasets.toy("8gaussians", 200, seed=1)
    np.testing.assert_allclose(-np.mean(exported.log_prob(test).numpy()), metrics["test_nll"], rtol=1e-4)


def test_sigterm_during_export_leaves_no_partial_saved_model(tmp_path):
    out = tmp_path / "out"
    process = _start(*TINY, "--epochs", "1", "--out", str(out))
    _wait_for(str(tmp_path / ".out.tmp-*" / "saved_model"), process)
    process.send_signal(signal.SIGTERM)
    status, printed, errors = _finish(process)
    assert status == 143 and "Traceback" not in errors, errors
    assert os.listdir(tmp_path) == ["out"]
    metrics = _assert_one_complete_run(out)
    # Training had finished: the run is complete, the signal is recorded.
    assert metrics["interrupted"] is False and metrics["signal"] == "SIGTERM" and metrics["epochs_run"] == 1
    exported = tf.saved_model.load(str(out / "saved_model"))
    assert np.isfinite(exported.log_prob(datasets.toy("8gaussians", 10, seed=1)).numpy()).all()


def test_a_non_finite_nll_exits_1_and_keeps_the_run_for_inspection(tmp_path):
    # Accepted (each x² fits in float32) but the batch sum of x²/2 overflows: NLL = inf.
    data = np.random.default_rng(0).uniform(-1.8e19, 1.8e19, (400, 1)).astype(np.float32)
    path = _npy(tmp_path, "large.npy", data)
    out = tmp_path / "out"
    status, printed, errors = _finish(_start(*TINY, "--data", path, "--epochs", "2", "--out", str(out)))
    lines = errors.splitlines()
    assert status == 1 and len(lines) == 1 and "Traceback" not in errors, errors
    assert re.match(r"tfp-flows: error: training stopped: .*(nll|NLL) became inf in epoch 1", lines[0]), lines[0]
    assert "standardise the data" in lines[0]
    temp = glob.glob(str(tmp_path / ".out.tmp-*"), include_hidden=True)
    assert len(temp) == 1 and temp[0] in lines[0] and not out.exists()
    assert json.loads(open(os.path.join(temp[0], "run.json")).read())["status"] == "failed"
    # A usage error in a real process: one line, no traceback.
    status, printed, errors = _finish(_start("--resume", str(out)))
    assert status == 2 and printed == "" and errors == (
        f"tfp-flows: error: --resume: expected an unfinished run; given {temp[0]!r}, which stopped on a "
        "non-finite NLL (resuming would repeat it)\n")
