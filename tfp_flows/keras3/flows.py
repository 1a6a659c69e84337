"""Builders: the flows of `tfp_flows.definitions` as Keras 3 layers (`FlowLayer`).

Each builder has the name, arguments and docstring of its definition and returns
a `FlowLayer` owning the flow's `keras.Variable`s; `layer.bijector(context)` is
the TFP bijector (base to data). `Chain([...])` composes layers and fixed TFP
bijectors.
"""
from __future__ import annotations

import functools
from typing import Callable

from tfp_flows import definitions
from tfp_flows.definitions import Definition
from tfp_flows.keras3.layers import Chain, FlowLayer

__all__ = ["Chain", "FlowLayer", "planar_flow", "radial_flow", "maf", "iaf", "nice", "realnvp",
           "glow"]


def _builder(define: Callable[..., Definition]) -> Callable[..., FlowLayer]:
    @functools.wraps(define)
    def build(*args, **kwargs) -> FlowLayer:
        return FlowLayer(define(*args, **kwargs))

    build.__annotations__ = dict(build.__annotations__, **{"return": FlowLayer})
    return build


planar_flow = _builder(definitions.planar_flow)
radial_flow = _builder(definitions.radial_flow)
maf = _builder(definitions.maf)
iaf = _builder(definitions.iaf)
nice = _builder(definitions.nice)
realnvp = _builder(definitions.realnvp)
glow = _builder(definitions.glow)
