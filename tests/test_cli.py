import json
import math
import os

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


# ---------------------------------------------------------------- command line

def test_help_exits_zero_and_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ["--data", "--flow", "--layers", "--hidden", "--epochs", "--batch-size", "--lr", "--patience",
                 "--validation-split", "--n", "--n-test", "--seed", "--out", "--no-jit", "--quiet"]:
        assert flag in text
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    assert "fit" in capsys.readouterr().out


def test_no_arguments_means_the_default_fit():
    args = cli.build_parser().parse_args(["fit"])
    assert (args.data, args.flow, args.out) == ("8gaussians", "planar", os.path.join("runs", "default"))


@pytest.mark.parametrize("flow", sorted(cli.FLOW_BUILDERS))
def test_every_flow_name_builds_an_invertible_flow_of_the_requested_depth(flow):
    args = cli.build_parser().parse_args(["fit", "--flow", flow, "--layers", "3", "--hidden", "8"])
    bijector = cli._build_bijector(args, event_size=2, parser=None)
    x = tf.constant(datasets.toy("moons", 16, seed=0))
    np.testing.assert_allclose(bijector.forward(bijector.inverse(x)).numpy(), x.numpy(), atol=1e-4)
    assert len(bijector.trainable_variables) >= 3


def test_fit_on_toy_data_writes_all_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    # Without XLA to keep the test short (the compiled path runs in the .npy test below).
    cli.main(["fit", "--data", "8gaussians", "--flow", "planar", "--layers", "4", "--epochs", "6",
              "--batch-size", "64", "--n", "2500", "--n-test", "1000", "--lr", "0.01", "--no-jit",
              "--plot-samples", "1000", "--out", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert str(out) in printed
    for name in ["density.png", "metrics.json", "saved_model/saved_model.pb", "checkpoints/checkpoint"]:
        assert (out / name).exists(), name
    assert _is_png(out / "density.png")
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ["train_nll", "test_nll", "train_bits_per_dim", "test_bits_per_dim", "fit_seconds", "wall_seconds"]:
        assert math.isfinite(metrics[key]), key
    assert metrics["epochs_run"] == 6 and metrics["arguments"]["layers"] == 4
    np.testing.assert_allclose(metrics["test_bits_per_dim"], metrics["test_nll"] / (2 * math.log(2)))
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
    cli.main(["fit", "--data", str(path), "--flow", "maf", "--layers", "2", "--hidden", "16,16",
              "--epochs", "5", "--patience", "2", "--lr", "0.01", "--out", str(out), "--quiet"])
    assert "skipping density.png" in capsys.readouterr().out
    assert not (out / "density.png").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["event_size"] == 3 and metrics["num_test"] == 300 and metrics["num_train"] == 1200
    assert metrics["test_nll"] < metrics["standard_normal_test_nll"] - 1.0
    assert (out / "saved_model" / "saved_model.pb").exists()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--data", "swissroll"], "--data must be one of moons, 8gaussians"),
        (["--data", "missing.npy"], "does not exist"),
        (["--flow", "spline"], "--flow must be one of planar, radial, maf, iaf"),
        (["--layers", "0"], "--layers must be >= 1; given 0"),
        (["--lr", "-1"], "--lr must be a positive number"),
        (["--hidden", "64,x", "--flow", "maf"], "--hidden must be comma-separated integers"),
    ],
)
def test_bad_arguments_exit_with_a_clear_message(arguments, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", *arguments, "--out", str(tmp_path / "never")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_fit_flags_work_without_the_word_fit(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--flow", "spline", "--out", str(tmp_path / "never")])
    assert exit_info.value.code == 2
    assert "--flow must be one of" in capsys.readouterr().err


def test_npy_with_nan_or_wrong_rank_is_refused(tmp_path, capsys):
    bad = np.zeros((50, 2), np.float32)
    bad[7, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    np.save(tmp_path / "flat.npy", np.zeros(50, np.float32))
    for name, message in [("nan.npy", "must be finite"), ("flat.npy", "array [N, D]; given shape [50]")]:
        with pytest.raises(SystemExit):
            cli.main(["fit", "--data", str(tmp_path / name), "--out", str(tmp_path / "never")])
        assert message in capsys.readouterr().err
