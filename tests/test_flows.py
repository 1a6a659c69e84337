"""The builders of `tfp_flows.flows`: exact bijections for random parameters, seeds, configs."""
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras

from tfp_flows import definitions, flows
from tfp_flows.bijectors import Squeeze
from tfp_flows.flows import Flow
from flow_checks import autodiff_log_det, fresh

tfb = tfp.bijectors

BUILDERS = {
    "planar_flow": (lambda **k: flows.planar_flow(2, 3, **k), [2]),
    "radial_flow": (lambda **k: flows.radial_flow(2, 3, **k), [2]),
    "maf": (lambda **k: flows.maf(3, 2, [8, 8], **k), [3]),
    "iaf": (lambda **k: flows.iaf(3, 2, [8, 8], **k), [3]),
    "nice": (lambda **k: flows.nice(4, 3, [8], **k), [4]),
    "realnvp": (lambda **k: flows.realnvp(4, 3, [8], **k), [4]),
    "glow": (lambda **k: flows.glow([4, 4, 1], 2, 1, 4, **k), [4, 4, 1]),
}


def perturbed(builder, dtype, seed=0):
    """A flow moved off its (near-)identity start, so that every parameter matters."""
    make, shape = BUILDERS[builder]
    flow = make(seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed + 1)
    flow.initialize(tf.constant(rng.normal(1.0, 2.0, size=[16, *shape]), dtype))
    for v in flow.trainable_variables:
        v.assign_add(tf.constant(0.2 * rng.normal(size=v.shape), dtype))
    return flow, shape


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
@pytest.mark.parametrize("builder", sorted(BUILDERS))
def test_round_trip_and_log_det_match_autodiff(builder, dtype):
    flow, shape = perturbed(builder, dtype)
    tol = 1e-3 if dtype == tf.float32 else 1e-9
    z = tf.constant(np.random.default_rng(2).normal(size=[4, *shape]), dtype)
    x = flow.forward(z)
    assert np.abs(x.numpy() - z.numpy()).max() > 1e-2  # not the identity
    np.testing.assert_allclose(flow.inverse(fresh(x)).numpy(), z.numpy(), atol=tol, rtol=tol)
    fldj = flow.forward_log_det_jacobian(z, event_ndims=len(shape)).numpy()
    np.testing.assert_allclose(fldj, autodiff_log_det(flow, z), atol=10 * tol, rtol=tol)
    ildj = flow.inverse_log_det_jacobian(fresh(x), event_ndims=len(shape)).numpy()
    np.testing.assert_allclose(ildj, -fldj, atol=10 * tol, rtol=tol)


@pytest.mark.parametrize("builder", sorted(BUILDERS))
def test_equal_seeds_give_bitwise_equal_flows_and_configs_rebuild_them(builder):
    make, _ = BUILDERS[builder]
    a, b, c = make(seed=7), make(seed=7), make(seed=8)
    for va, vb in zip(a.variables, b.variables):
        np.testing.assert_array_equal(va.numpy(), vb.numpy())
    assert any(not np.array_equal(va.numpy(), vc.numpy())
               for va, vc in zip(a.variables, c.variables) if va.trainable)
    rebuilt = Flow.from_config(a.config)
    assert rebuilt.config == a.config
    for va, vr in zip(a.variables, rebuilt.variables):
        np.testing.assert_array_equal(va.numpy(), vr.numpy())


def test_builders_share_the_definitions_signatures_and_docs():
    import inspect

    for name in definitions.BUILDERS:
        builder = getattr(flows, name)
        assert builder.__doc__ == definitions.BUILDERS[name].__doc__
        assert (list(inspect.signature(builder).parameters)
                == list(inspect.signature(definitions.BUILDERS[name]).parameters))


def test_flow_composes_with_tfp_and_trains_under_xla():
    tfd = tfp.distributions
    flow = tfb.Chain([flows.planar_flow(2, 4, seed=0), tfb.Shift([0.5, -0.5]),
                      flows.maf(2, 2, [8, 8], seed=1)])
    dist = tfd.TransformedDistribution(tfd.MultivariateNormalDiag(tf.zeros(2)), flow)
    data = tf.constant(np.random.default_rng(0).normal([2.0, -1.0], 0.5, size=[256, 2]), tf.float32)
    optimizer = tf_keras.optimizers.Adam(0.05)

    @tf.function(jit_compile=True)
    def step():
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(dist.log_prob(data))
        optimizer.apply_gradients(zip(tape.gradient(loss, flow.trainable_variables),
                                      flow.trainable_variables))
        return loss

    losses = [float(step()) for _ in range(40)]
    assert losses[-1] < losses[0] - 0.5


def test_conditional_flow_refuses_missing_or_unexpected_context():
    conditional = flows.realnvp(2, 2, [8], seed=0, context_size=3)
    with pytest.raises(ValueError, match=r"conditional on a context of size 3"):
        conditional.forward(tf.zeros([2, 2]))
    with pytest.raises(ValueError, match=r"`context` must have shape \[..., 3\]; given shape \[2, 4\]"):
        conditional.forward(tf.zeros([2, 2]), context=tf.zeros([2, 4]))
    with pytest.raises(ValueError, match="unconditional"):
        flows.realnvp(2, 2, [8], seed=0).forward(tf.zeros([2, 2]), context=tf.zeros([2, 3]))


@pytest.mark.parametrize("call, match", [
    (lambda: flows.planar_flow(None, 2), "event_size"),
    (lambda: flows.planar_flow(2, 0), "num_layers"),
    (lambda: flows.maf(2, 2, [], seed=0), "hidden_units"),
    (lambda: flows.nice(1, 2), "event_size"),
    (lambda: flows.glow([8, 8]), "image_shape"),
    (lambda: flows.realnvp(2, seed=2**32 + 5), "seed"),
    (lambda: flows.radial_flow(2, 2, dtype=tf.int32), "dtype"),
    (lambda: flows.iaf(2, activation="swish?"), "activation"),
])
def test_builders_refuse_bad_arguments_naming_them(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


def test_two_flows_in_one_process_keep_separate_caches():
    """Equal-looking flows must not compare their definitions' arrays (TFP's cache compares)."""
    a, b = flows.glow([4, 4, 1], 1, 1, 4, seed=0), flows.glow([4, 4, 1], 1, 1, 4, seed=0)
    data = tf.constant(np.random.default_rng(0).normal(2.0, 1.0, size=[8, 4, 4, 1]), tf.float32)
    za = a.inverse(data)
    b.initialize(data)  # clears b's cache entries while a's are alive
    a.initialize(data)
    np.testing.assert_allclose(a.inverse(data).numpy(), b.inverse(fresh(data)).numpy(), atol=1e-6)
    assert np.abs(a.inverse(data).numpy() - za.numpy()).max() > 1e-3


def test_tf_keras_flow_model_points_keras3_layers_to_the_keras3_path():
    from tfp_flows import FlowModel
    from tfp_flows.keras3 import flows as keras3_flows

    with pytest.raises(TypeError, match="tfp_flows.keras3 import FlowModel"):
        FlowModel(keras3_flows.planar_flow(2, 2, seed=0), [2])


@pytest.mark.parametrize("builder", sorted(BUILDERS))
def test_bijector_hashes_are_tfps_and_computed_once(builder, monkeypatch):
    """TFP's cache hashes a bijector at every lookup; ours give TFP's value, computed once."""
    flow, shape = perturbed(builder, tf.float32)
    parts = [flow, *flow.bijector()._flatten(predicate=lambda o: isinstance(o, tfb.Bijector))]
    ours = [p for p in parts if type(p).__module__.startswith("tfp_flows")]
    assert len(ours) >= 2
    expected = [tfb.Bijector.__hash__(p) for p in ours]
    assert [hash(p) for p in ours] == expected
    computed = []
    tfp_hash = tfb.Bijector.__hash__
    monkeypatch.setattr(tfb.Bijector, "__hash__", lambda self: computed.append(
        id(self) if type(self).__module__.startswith("tfp_flows") else None) or tfp_hash(self))
    assert [hash(p) for p in ours] == expected
    assert not set(computed) & {id(p) for p in ours}
    # A pass (its cache lookups hash each bijector several times) computes each of ours once.
    flow.inverse(tf.zeros([2, *shape]))
    ours_computed = [i for i in computed if i is not None]
    assert ours_computed and len(set(ours_computed)) == len(ours_computed)
    assert Squeeze() == Squeeze() and hash(Squeeze()) == hash(Squeeze())
