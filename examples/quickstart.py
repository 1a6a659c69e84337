"""The README's example: a Planar + MAF + Radial chain fitted with FlowModel.fit."""
import tensorflow_probability as tfp

from tfp_flows import FlowModel, flows
from tfp_flows.datasets import toy

tfb = tfp.bijectors

x_train, x_test = toy("8gaussians", 20_000, seed=0), toy("8gaussians", 5_000, seed=1)
bijector = tfb.Chain([
    flows.planar_flow(2, num_layers=8, seed=0),
    flows.maf(2, num_layers=3, hidden_units=[64, 64], seed=2),
    flows.radial_flow(2, num_layers=8, seed=1),
])
model = FlowModel(bijector, event_shape=[2])    # base: standard normal
model.compile(learning_rate=3e-3)               # NLL built in, jit_compile=True
model.fit(x_train, epochs=30, batch_size=512, validation_split=0.1, patience=5)
print("test NLL (nats):", -model.log_prob(x_test).numpy().mean())
samples = model.sample(1000, seed=0)            # model.distribution is a tfd.TransformedDistribution
model.export("runs/quickstart_savedmodel")      # reloads with plain tf.saved_model.load
