"""Glow's parts (ActNorm, Invertible1x1Conv, Squeeze, factor_out) and the `glow` builder."""
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras

from tfp_flows import FlowModel
from tfp_flows.bijectors import (ActNorm, AffineCoupling, GlowStep, Invertible1x1Conv, Squeeze,
                                factor_out, rotation_lu)
from flow_checks import autodiff_log_det, fresh

tfb = tfp.bijectors
tfd = tfp.distributions


def initialised_act_norm(channels, dtype):
    rng = np.random.default_rng(5)
    batch = tf.constant(rng.normal(2.0, 3.0, size=[8, 4, 4, channels]), dtype)
    return ActNorm(tf.Variable(ActNorm.initial_values(batch)))


def conv1x1(channels, seed=0, dtype=tf.float32):
    permutation, lower_upper, sign = rotation_lu(channels, seed)
    return Invertible1x1Conv(tf.Variable(lower_upper.astype(dtype.as_numpy_dtype)), permutation, sign)


def make_bijectors(dtype):
    inner = tfb.Chain([conv1x1(2, seed=3, dtype=dtype), initialised_act_norm(2, dtype)])
    return {
        "act_norm": initialised_act_norm(4, dtype),
        "conv1x1": conv1x1(4, seed=1, dtype=dtype),
        "squeeze": Squeeze(),
        "unsqueeze": tfb.Invert(Squeeze()),
        "factor_out": factor_out(inner, num_kept=2, channels=4),
    }


SHAPES = {"unsqueeze": [2, 2, 16]}
CASES = ["act_norm", "conv1x1", "squeeze", "unsqueeze", "factor_out"]


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
@pytest.mark.parametrize("case", CASES)
def test_round_trip_and_log_det(case, dtype):
    bijector = make_bijectors(dtype)[case]
    shape = [5] + SHAPES.get(case, [4, 4, 4])
    tol = 1e-4 if dtype == tf.float32 else 1e-10
    z = tf.constant(np.random.default_rng(1).normal(size=shape), dtype)
    x = bijector.forward(z)
    assert x.dtype == dtype
    np.testing.assert_allclose(bijector.inverse(fresh(x)).numpy(), z.numpy(), atol=tol)
    fldj = np.broadcast_to(bijector.forward_log_det_jacobian(z, event_ndims=3).numpy(), [5])
    np.testing.assert_allclose(fldj, autodiff_log_det(bijector, z), atol=20 * tol)
    ildj = bijector.inverse_log_det_jacobian(fresh(x), event_ndims=3).numpy()
    np.testing.assert_allclose(np.broadcast_to(ildj, [5]), -fldj, atol=20 * tol)


@pytest.mark.parametrize("case", CASES)
def test_compiles_with_xla(case):
    bijector = make_bijectors(tf.float32)[case]
    shape = [3] + SHAPES.get(case, [4, 4, 4])
    z = tf.constant(np.random.default_rng(2).normal(size=shape), tf.float32)

    def run(z):
        x = bijector.forward(z)
        return x, bijector.inverse(tf.identity(x))

    compiled = tf.function(run, jit_compile=True)(z)
    for got, want in zip(compiled, run(z)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)


def test_act_norm_initial_values_normalise_the_batch_and_compile():
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal([1.0, -4.0, 10.0], [0.5, 2.0, 7.0], size=[16, 5, 5, 3]), tf.float32)
    values = tf.function(ActNorm.initial_values, jit_compile=True)(x)
    z = ActNorm(values).inverse(x).numpy()
    np.testing.assert_allclose(z.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=(0, 1, 2)), 1.0, rtol=1e-4)


def test_act_norm_is_a_pure_function_of_its_parameter():
    """No side effects: a forward before any initialisation and the inverse of its output agree."""
    parameter = tf.Variable(tf.zeros([2, 2]))
    act_norm = ActNorm(parameter)
    z = tf.random.normal([4, 2], seed=1)
    x = act_norm.forward(z)
    np.testing.assert_allclose(x.numpy(), z.numpy())
    np.testing.assert_allclose(act_norm.inverse(x).numpy(), z.numpy())
    parameter.assign([[1.0, -1.0], [0.5, 0.2]])  # a variable, read at each call
    z = fresh(z)  # (TFP's cache keys on tensors: a new tensor sees the new value)
    x = act_norm.forward(z)
    np.testing.assert_allclose(x.numpy(), (z.numpy() + [1.0, -1.0]) * np.exp([0.5, 0.2]), rtol=1e-6)
    np.testing.assert_allclose(act_norm.inverse(fresh(x)).numpy(), z.numpy(), atol=1e-6)
    graph = tf.function(act_norm.inverse).get_concrete_function(z).graph
    assert not [op for op in graph.get_operations() if op.type == "AssignVariableOp"]


def test_glow_initialize_is_explicit_and_keeps_bijections_consistent():
    from tfp_flows.flows import glow

    flow = glow([4, 4, 1], levels=1, steps_per_level=2, hidden_channels=4, seed=0)
    rng = np.random.default_rng(3)
    data = tf.constant(rng.normal(3.0, 2.0, size=[32, 4, 4, 1]), tf.float32)
    z = flow.inverse(data)  # before initialisation: ActNorm is the identity, nothing changes
    np.testing.assert_allclose(flow.forward(fresh(z)).numpy(), data.numpy(), atol=1e-5)
    assert flow.needs_initialization
    flow.initialize(data)
    assert not flow.needs_initialization
    before = [v.numpy().copy() for v in flow.trainable_variables]
    flow.initialize(data * 10.0)  # once only
    for b, v in zip(before, flow.trainable_variables):
        np.testing.assert_array_equal(b, v.numpy())
    # The same tensor, inverted again after initialisation, gives the new (not a cached) result.
    z_after = flow.inverse(data).numpy()
    assert np.abs(z_after - z.numpy()).max() > 0.1
    np.testing.assert_allclose(abs(z_after.mean()), 0.0, atol=0.3)
    np.testing.assert_allclose(flow.forward(fresh(tf.constant(z_after))).numpy(), data.numpy(), atol=1e-4)


def test_a_chain_initialises_each_glow_from_the_data_reaching_it():
    """`routing.initialize` on `Chain([Shift, glow_a, glow_b, Scale])`: glow_a's ActNorm from
    the shifted data, glow_b's from glow_a's latent of it (after glow_a's initialisation)."""
    from tfp_flows import routing
    from tfp_flows.flows import glow

    glow_a, glow_b, reference_a, reference_b = (
        glow([4, 4, 1], levels=1, steps_per_level=1, hidden_channels=4, seed=seed)
        for seed in (0, 1, 0, 1))
    rng = np.random.default_rng(4)
    x = tf.constant(rng.normal(3.0, 2.0, size=[32, 4, 4, 1]), tf.float32)
    routing.initialize(tfb.Chain([tfb.Shift(-1.0), glow_a, glow_b, tfb.Scale(2.0)]), x)
    reference_a.initialize(x + 1.0)  # Shift(-1)'s inverse adds 1
    reference_b.initialize(reference_a.inverse(x + 1.0))
    for flow, reference in ((glow_a, reference_a), (glow_b, reference_b)):
        assert not flow.needs_initialization
        np.testing.assert_array_equal(flow.parameter_variables["act_norm_0_0"].numpy(),
                                      reference.parameter_variables["act_norm_0_0"].numpy())
    # glow_b saw glow_a's latent, not the data: from the data its values would differ.
    from_data = glow([4, 4, 1], levels=1, steps_per_level=1, hidden_channels=4, seed=1)
    from_data.initialize(x + 1.0)
    assert np.abs(from_data.parameter_variables["act_norm_0_0"].numpy()
                  - glow_b.parameter_variables["act_norm_0_0"].numpy()).max() > 0.1


def test_glow_initialises_on_the_first_fit_batch():
    """With a negligible learning rate, the ActNorm values after one fit step are the init values."""
    from tfp_flows.flows import glow

    flow = glow([4, 4, 1], levels=1, steps_per_level=1, hidden_channels=4, seed=0)
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 0.5, size=[32, 4, 4, 1]).astype(np.float32)
    model = FlowModel(flow, event_shape=[4, 4, 1])
    model.compile(tf_keras.optimizers.SGD(learning_rate=1e-30), jit_compile=True)
    model.fit(x, epochs=1, batch_size=32, verbose=0)
    expected = flow.definition.initial_values_from_data(
        {k: tf.zeros_like(v) if k.startswith("act_norm") else v
         for k, v in flow.parameter_variables.items()}, x)
    np.testing.assert_allclose(flow.parameter_variables["act_norm_0_0"].numpy(),
                               expected["act_norm_0_0"].numpy(), rtol=1e-5)
    assert not flow.needs_initialization


def test_conv1x1_starts_orthogonal_and_stays_invertible_under_large_steps():
    conv = conv1x1(4, seed=0)
    weight = conv.weight().numpy()
    np.testing.assert_allclose(weight @ weight.T, np.eye(4), atol=1e-5)
    # Fit a nearly singular linear map with a huge learning rate.
    rng = np.random.default_rng(0)
    mixing = np.diag([30.0, 1.0, 0.05, 1e-3]) @ np.linalg.qr(rng.normal(size=(4, 4)))[0]
    data = tf.constant(rng.normal(size=(256, 4)) @ mixing.T, tf.float32)
    flow = tfd.TransformedDistribution(tfd.Sample(tfd.Normal(0.0, 1.0), [4]), conv)
    optimizer = tf_keras.optimizers.Adam(learning_rate=0.5)

    @tf.function(jit_compile=True)
    def step():
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(flow.log_prob(data))
        optimizer.apply_gradients(zip(tape.gradient(loss, conv.trainable_variables), conv.trainable_variables))
        return loss

    losses = [float(step()) for _ in range(300)]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    weight = conv.weight().numpy().astype(np.float64)
    sign, log_abs = np.linalg.slogdet(weight)
    assert sign != 0
    np.testing.assert_allclose(log_abs, conv.log_abs_diagonal.numpy().sum(), rtol=1e-4, atol=1e-3)
    z = tf.random.normal([8, 4], seed=3)
    np.testing.assert_allclose(conv.inverse(fresh(conv.forward(z))).numpy(), z.numpy(), atol=1e-3)


def _conv_conditioner(channels_in, channels_out, dtype, seed):
    """A small fixed convolutional shift-and-log-scale map (not the identity)."""
    kernel = tf.constant(0.3 * np.random.default_rng(seed).normal(size=(3, 3, channels_in,
                                                                        channels_out)), dtype)
    return lambda x: tf.nn.conv2d(x, kernel, strides=1, padding="SAME")


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_glow_step_equals_the_chain_of_its_parts(dtype):
    rng = np.random.default_rng(4)
    permutation, lower_upper, sign = rotation_lu(4, seed=2)
    lower_upper = lower_upper + 0.2 * rng.normal(size=(4, 4))
    bias_log_scale = tf.constant(rng.normal(scale=0.5, size=(2, 4)), dtype)
    lower_upper = tf.constant(lower_upper, dtype)
    conditioner = _conv_conditioner(2, 4, dtype, seed=3)
    step = GlowStep(bias_log_scale, lower_upper, permutation, sign, conditioner, 2)
    chain = tfb.Chain([ActNorm(bias_log_scale),
                       tfb.Invert(Invertible1x1Conv(lower_upper, permutation, sign)),
                       AffineCoupling(conditioner, 2, event_ndims=3)])
    tol = 1e-4 if dtype == tf.float32 else 1e-11
    x = tf.constant(rng.normal(size=(2, 3, 4, 4, 4)), dtype)  # two batch axes
    z = step.inverse(x)
    np.testing.assert_allclose(z.numpy(), chain.inverse(fresh(x)).numpy(), rtol=tol, atol=tol)
    for direction, point in (("inverse", x), ("forward", z)):
        ours = getattr(step, f"{direction}_log_det_jacobian")(fresh(point), event_ndims=3)
        theirs = getattr(chain, f"{direction}_log_det_jacobian")(fresh(point), event_ndims=3)
        assert ours.shape == [2, 3]
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(step.forward(fresh(z)).numpy(), x.numpy(), rtol=10 * tol, atol=10 * tol)
    np.testing.assert_allclose(step.forward(z).numpy(), chain.forward(fresh(z)).numpy(),
                               rtol=tol, atol=tol)
    with pytest.raises(ValueError, match=r"same channel count; given 4 and 2"):
        GlowStep(bias_log_scale, tf.zeros([2, 2], dtype), None, None, conditioner, 2)


def test_squeeze_moves_each_2x2_block_into_channels():
    image = np.arange(4 * 6 * 2, dtype=np.float32).reshape(1, 4, 6, 2)
    squeezed = Squeeze().forward(image).numpy()
    assert squeezed.shape == (1, 2, 3, 8)
    for i, j, dy, dx, c in np.ndindex(2, 3, 2, 2, 2):
        assert squeezed[0, i, j, (2 * dy + dx) * 2 + c] == image[0, 2 * i + dy, 2 * j + dx, c]
    assert Squeeze().forward_event_shape([4, 6, 2]) == [2, 3, 8]
    assert Squeeze().inverse_event_shape([2, 3, 8]) == [4, 6, 2]


def test_parts_reject_bad_shapes_with_expected_and_given():
    with pytest.raises(ValueError, match=r"even; given event shape \[5, 4, 1\]"):
        Squeeze().forward(tf.zeros([2, 5, 4, 1]))
    with pytest.raises(ValueError, match=r"divisible by 4; given event shape \[2, 2, 6\]"):
        Squeeze().inverse(tf.zeros([1, 2, 2, 6]))
    with pytest.raises(ValueError, match=r"expected 4 channels.*given shape \[1, 2, 2, 3\]"):
        conv1x1(4).forward(tf.zeros([1, 2, 2, 3]))
    with pytest.raises(ValueError, match=r"expected 3 channels.*given shape \[1, 2\]"):
        ActNorm(tf.zeros([2, 3])).inverse(tf.zeros([1, 2]))
    with pytest.raises(ValueError, match=r"num_kept.*\[1, 3\]; given 4"):
        factor_out(tfb.Identity(), num_kept=4, channels=4)
    with pytest.raises(ValueError, match=r"bias_log_scale.*shape \[2, channels\]; given \[3, 2\]"):
        ActNorm(tf.zeros([3, 2]))
    with pytest.raises(ValueError, match=r"permutation matrix"):
        Invertible1x1Conv(tf.zeros([2, 2]), permutation=np.ones([2, 2]))


def perturbed_glow(dtype):
    """A small Glow moved off its identity start, with ActNorm initialised on data."""
    from tfp_flows.flows import glow

    flow = glow([8, 8, 1], levels=2, steps_per_level=2, hidden_channels=8, seed=0, dtype=dtype)
    rng = np.random.default_rng(1)
    flow.initialize(tf.constant(rng.normal(1.0, 2.0, size=[16, 8, 8, 1]), dtype))
    for variable in flow.trainable_variables:
        variable.assign_add(tf.constant(0.05 * rng.normal(size=variable.shape), dtype))
    return flow


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_glow_multiscale_log_det_matches_autodiff(dtype):
    flow = perturbed_glow(dtype)
    tol = 2e-3 if dtype == tf.float32 else 1e-9
    z = tf.constant(np.random.default_rng(2).normal(size=[3, 8, 8, 1]), dtype)
    fldj = flow.forward_log_det_jacobian(z, event_ndims=3).numpy()
    assert np.all(np.abs(fldj) > 1.0)  # the perturbation made the map non-trivial
    np.testing.assert_allclose(fldj, autodiff_log_det(flow, z), rtol=tol, atol=tol)
    x = fresh(flow.forward(z))
    np.testing.assert_allclose(flow.inverse(x).numpy(), z.numpy(), atol=10 * tol)
    np.testing.assert_allclose(flow.inverse_log_det_jacobian(x, event_ndims=3).numpy(), -fldj, rtol=tol)


def test_glow_starts_orthogonal_and_owns_its_variables():
    from tfp_flows.flows import glow

    flow = glow([8, 8, 2], levels=2, steps_per_level=1, hidden_channels=4, seed=0)
    # One variable per part and step: ActNorm [2, C], the 1x1 conv's packed LU [C, C], and
    # the coupling network's 3x3 conv, 1x1 conv and 3x3 conv (kernels and biases).
    def step_sizes(channels, hidden=4):
        half = channels // 2
        network = 9 * half * hidden + hidden + hidden * hidden + hidden + 9 * hidden * channels + channels
        return [2 * channels, channels * channels, network]

    sizes = sorted(int(np.prod(v.shape)) for v in flow.trainable_variables)
    assert sizes == sorted(step_sizes(8) + step_sizes(16))
    z = tf.random.normal([2, 8, 8, 2], seed=4)
    x = flow.forward(z)
    # ActNorm and the couplings start at the identity, the 1x1 convs at rotations and the
    # squeezes permute pixels: the start is an orthogonal map, preserving each image's norm.
    assert np.abs(x.numpy() - z.numpy()).max() > 0.1
    norms = [np.linalg.norm(t.numpy().reshape(2, -1), axis=1) for t in (x, z)]
    np.testing.assert_allclose(norms[0], norms[1], rtol=1e-5)
    np.testing.assert_allclose(flow.forward_log_det_jacobian(z, event_ndims=3), 0.0, atol=1e-5)


def test_glow_xla_training_step_lowers_the_loss_and_exports(tmp_path):
    import subprocess
    import sys

    from tfp_flows.flows import glow

    rng = np.random.default_rng(0)
    blobs = np.zeros([256, 8, 8, 1], np.float32)
    blobs[:, 2:6, 2:6, 0] = rng.uniform(0.5, 1.0, size=[256, 1, 1])
    data = blobs + 0.05 * rng.normal(size=blobs.shape).astype(np.float32)
    model = FlowModel(
        glow([8, 8, 1], levels=2, steps_per_level=1, hidden_channels=8, seed=0), event_shape=[8, 8, 1]
    )
    model.compile(learning_rate=1e-3, jit_compile=True)
    history = model.fit(data, epochs=5, batch_size=64, verbose=0).history["nll"]
    assert np.all(np.isfinite(history)) and history[-1] < history[0] - 5.0
    path = model.export(str(tmp_path / "glow"))
    expected = model.log_prob(data[:4]).numpy()
    script = (
        "import sys, numpy as np, tensorflow as tf\n"
        "m = tf.saved_model.load(sys.argv[1])\n"
        "x = np.load(sys.argv[2])\n"
        "s = m.sample(tf.constant(5)).numpy()\n"
        "assert s.shape == (5, 8, 8, 1) and np.isfinite(s).all(), s.shape\n"
        "print(repr(m.log_prob(tf.constant(x)).numpy().tolist()))\n"
    )
    np.save(tmp_path / "x.npy", data[:4])
    result = subprocess.run(
        [sys.executable, "-c", script, path, str(tmp_path / "x.npy")],
        capture_output=True, text=True, timeout=300,
        env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    reloaded = np.array(eval(result.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(reloaded, expected, rtol=1e-4)


def test_glow_rejects_bad_shapes_at_construction():
    from tfp_flows.flows import glow

    with pytest.raises(ValueError, match=r"divisible by 2\*\*levels = 4.*given image_shape \[6, 8, 1\]"):
        glow([6, 8, 1], levels=2, steps_per_level=1)
    with pytest.raises(ValueError, match=r"divisible by 2\*\*levels = 16.*given image_shape \[8, 8, 3\]"):
        glow([8, 8, 3], levels=4, steps_per_level=1)
    flow = glow([8, 8, 1], levels=1, steps_per_level=1, hidden_channels=4)
    model = FlowModel(flow, event_shape=[8, 8, 1])
    with pytest.raises(ValueError, match=r"shape \[N, 8, 8, 1\].*given shape \[10, 8, 8, 3\]"):
        model.fit(np.zeros([10, 8, 8, 3], np.float32), epochs=1, verbose=0)
