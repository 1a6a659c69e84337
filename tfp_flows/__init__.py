"""tfp_flows: normalizing flows as TensorFlow Probability bijectors.

`tfp_flows.bijectors` holds the bijectors, `tfp_flows.flows` the builders that
own their variables, `FlowModel` trains any flow with tf_keras `fit`;
`tfp_flows.keras3` trains the same flows with Keras 3. `vi`, `dual_ascent`,
`datasets` and `plotting` load on first use.
"""
import importlib

from tfp_flows import bijectors, flows
from tfp_flows.export import export_distribution
from tfp_flows.model import FlowModel

__all__ = ["FlowModel", "bijectors", "datasets", "dual_ascent", "export_distribution", "flows",
           "keras3", "plotting", "vi"]
__version__ = "0.1.0"

_LAZY = ("datasets", "dual_ascent", "keras3", "plotting", "vi")


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f"tfp_flows.{name}")
    raise AttributeError(f"module 'tfp_flows' has no attribute {name!r}")
