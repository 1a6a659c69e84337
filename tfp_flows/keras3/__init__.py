"""tfp_flows on Keras 3 (`import keras`, TensorFlow backend).

`tfp_flows.keras3.flows` builds the flows of `tfp_flows.definitions` as Keras 3
layers that own their `keras.Variable`s; `FlowModel` trains them with
`keras.Model.fit` (NLL built in) and exports the same SavedModel as
`tfp_flows.FlowModel`.
"""
from tfp_flows.keras3 import flows
from tfp_flows.keras3.layers import Chain, FlowLayer
from tfp_flows.keras3.model import FlowModel

__all__ = ["Chain", "FlowLayer", "FlowModel", "flows"]
