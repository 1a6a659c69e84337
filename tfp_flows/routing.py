"""Walking a bijector tree: where a context goes, and which flows initialise from data.

TFP passes keyword arguments down a `tfb.Chain` by sub-bijector name and through
`tfb.Invert` unchanged; these helpers build those nested keyword arguments for a
context, so that a `tfb.Chain` mixing `tfp_flows` flows, TFP's conditional
`MaskedAutoregressiveFlow` and fixed bijectors conditions every part that can be.
"""
from __future__ import annotations

import tensorflow as tf
import tensorflow_probability as tfp

from tfp_flows.flows import Flow

tfb = tfp.bijectors

__all__ = ["bijector_kwargs", "check_conditioning", "conditional_parts", "initialize",
           "needs_initialization"]


def _children(bijector: tfb.Bijector) -> list:
    if isinstance(bijector, tfb.Invert):
        return [bijector.bijector]
    if isinstance(bijector, tfb.Composition) and type(bijector).__name__.lstrip("_") == "Chain":
        return list(bijector.bijectors)
    return []


def _own_kwargs(bijector: tfb.Bijector, context) -> dict:
    if isinstance(bijector, Flow):
        return {} if bijector.context_size is None else {"context": context}
    if isinstance(bijector, tfb.MaskedAutoregressiveFlow):
        network = getattr(bijector, "_shift_and_log_scale_fn", None)
        if getattr(network, "_conditional", False):
            return {"conditional_input": context}
    return {}


def bijector_kwargs(bijector: tfb.Bijector, context) -> dict:
    """Keyword arguments for `bijector`'s methods that give `context` to each conditional part."""
    if context is None:
        return {}
    own = _own_kwargs(bijector, context)
    if own:
        return own
    if isinstance(bijector, tfb.Invert):
        return bijector_kwargs(bijector.bijector, context)
    routed = {}
    for child in _children(bijector):
        kwargs = bijector_kwargs(child, context)
        if kwargs:
            routed.setdefault(child.name, {}).update(kwargs)
    return routed


def conditional_parts(bijector: tfb.Bijector) -> list:
    """The parts of `bijector` that take a context (as `(bijector, context size or None)`)."""
    if isinstance(bijector, Flow):
        return [] if bijector.context_size is None else [(bijector, bijector.context_size)]
    if _own_kwargs(bijector, tf.zeros([])):
        network = bijector._shift_and_log_scale_fn
        return [(bijector, getattr(network, "_conditional_event_shape", [None])[-1])]
    return [part for child in _children(bijector) for part in conditional_parts(child)]


def check_conditioning(bijector: tfb.Bijector, context_shape) -> None:
    """Refuse a conditional bijector without `context_shape`, or a context for an unconditional one."""
    parts = conditional_parts(bijector)
    if context_shape is None and parts:
        raise ValueError(
            f"`context_shape`: the bijector has conditional parts ({', '.join(p.name for p, _ in parts)}); "
            "pass context_shape=[k] to FlowModel."
        )
    if context_shape is not None:
        if not parts:
            raise ValueError(
                f"`context_shape`: given {list(context_shape)}, but no part of the bijector takes a "
                "context (build flows with context_size=k)."
            )
        for part, size in parts:
            if size is not None and int(size) != int(context_shape[0]):
                raise ValueError(
                    f"`context_shape`: {part.name} takes a context of size {size}; given "
                    f"context_shape {list(context_shape)}."
                )


def needs_initialization(bijector: tfb.Bijector) -> bool:
    """Whether some flow in `bijector` still waits for its data-dependent initialisation."""
    if isinstance(bijector, Flow):
        return bijector.needs_initialization
    return any(needs_initialization(child) for child in _children(bijector))


def initialize(bijector: tfb.Bijector, x, context=None) -> None:
    """Initialise every flow in `bijector` from the batch `x` reaching it (data to latent).

    Eager. A part's latent is computed only when a later part needs it as its input,
    so a lone flow runs its data-to-latent pass once (the initialisation's own). Flows
    under a `tfb.Invert` would see data in the latent-to-data direction and are left
    as they are.
    """
    _initialize(bijector, x, context, latent_needed=False)


def _initialize(bijector: tfb.Bijector, x, context, latent_needed: bool):
    """`initialize`, returning `bijector.inverse(x)` when `latent_needed`, else None."""
    if isinstance(bijector, Flow):
        flow_context = context if bijector.context_size is not None else None
        bijector.initialize(x, flow_context)
        return bijector.bijector(flow_context).inverse(x) if latent_needed else None
    children = [] if isinstance(bijector, tfb.Invert) else _children(bijector)
    if children:
        for index, child in enumerate(children):  # a Chain's inverse runs its first part first
            x = _initialize(child, x, context, latent_needed or index + 1 < len(children))
        return x
    return bijector.inverse(x, **bijector_kwargs(bijector, context)) if latent_needed else None
