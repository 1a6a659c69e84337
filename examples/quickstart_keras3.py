"""The README's Keras 3 example: the same flows as Keras 3 layers, trained with keras.Model.fit."""
import keras
import tensorflow_probability as tfp

from tfp_flows.datasets import toy
from tfp_flows.keras3 import FlowModel, flows

tfb = tfp.bijectors

x_train, x_test = toy("8gaussians", 20_000, seed=0), toy("8gaussians", 5_000, seed=1)
flow = flows.Chain([
    flows.planar_flow(2, num_layers=8, seed=0),
    flows.maf(2, num_layers=3, hidden_units=[64, 64], seed=2),   # our packed MADE, Keras 3 variables
    flows.radial_flow(2, num_layers=8, seed=1),
])
model = FlowModel(flow, event_shape=[2])
model.compile(optimizer=keras.optimizers.Adam(3e-3))            # NLL built in, jit_compile=True
model.fit(x_train, epochs=30, batch_size=512, validation_split=0.1,
          callbacks=[keras.callbacks.EarlyStopping(patience=5, restore_best_weights=True)])
print("test NLL (nats):", -model.log_prob(x_test).numpy().mean())
model.save("runs/quickstart.keras")                             # keras.models.load_model reloads it
model.export("runs/quickstart_keras3_savedmodel")               # plain tf.saved_model.load, no TFP
