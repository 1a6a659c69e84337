"""Builders: the flows of `tfp_flows.definitions` as Keras 3 layers (`FlowLayer`).

Each builder has the name, arguments and docstring of its definition and returns
a `FlowLayer` owning the flow's `keras.Variable`s; `layer.bijector(context)` is
the TFP bijector (base to data). `Chain([...])` composes layers and fixed TFP
bijectors.
"""
from __future__ import annotations


from tfp_flows import definitions
from tfp_flows.keras3.layers import Chain, FlowLayer

__all__ = ["Chain", "FlowLayer", "planar_flow", "radial_flow", "maf", "iaf", "nice", "realnvp",
           "glow"]


planar_flow, radial_flow, maf, iaf, nice, realnvp, glow = definitions.front_end(FlowLayer)
