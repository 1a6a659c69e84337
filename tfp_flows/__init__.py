"""tfp_flows: normalizing flows as TensorFlow Probability bijectors.

`tfp_flows.bijectors` holds the bijectors, `tfp_flows.flows` the builders that
own their variables, `FlowModel` trains any flow with Keras `fit`.
"""
from tfp_flows import bijectors, flows
from tfp_flows.export import export_distribution
from tfp_flows.model import FlowModel

__all__ = ["FlowModel", "bijectors", "export_distribution", "flows"]
__version__ = "0.1.0"
