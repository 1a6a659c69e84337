"""Normalizing-flow bijectors for TensorFlow Probability."""
from tfp_flows.bijectors.planar import Planar, PlanarStack
from tfp_flows.bijectors.radial import Radial, RadialStack
from tfp_flows.bijectors.stack import LayerStack
from tfp_flows.bijectors.dual_ascent import DualAscentFlow, DualAscentMap, Rotation
from tfp_flows.bijectors.coupling import AdditiveCoupling, AffineCoupling, NICERescale
from tfp_flows.bijectors.glow import ActNorm, GlowStep, Invertible1x1Conv, Squeeze, factor_out, rotation_lu
from tfp_flows.bijectors.autoregressive import MaskedAutoregressiveAffine
