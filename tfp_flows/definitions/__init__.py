"""One definition per flow: parameters and bijector construction, shared by every front end.

`define(builder, **arguments)` returns the `Definition` of a registered builder
(`planar_flow`, `radial_flow`, `maf`, `iaf`, `nice`, `realnvp`, `glow`);
`tfp_flows.flows` and `tfp_flows.keras3.flows` wrap these functions, so their
builders share names, arguments and docstrings.
"""
from tfp_flows.definitions.core import BUILDER_NAMES, BUILDERS, Definition, Parameter, define, front_end
from tfp_flows.definitions.elementwise import planar_flow, radial_flow
from tfp_flows.definitions.autoregressive import iaf, maf
from tfp_flows.definitions.coupling import nice, realnvp
from tfp_flows.definitions.glow import glow

__all__ = ["BUILDER_NAMES", "BUILDERS", "Definition", "Parameter", "define", "front_end", "glow", "iaf", "maf", "nice",
           "planar_flow", "radial_flow", "realnvp"]
