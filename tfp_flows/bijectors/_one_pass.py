"""Bijectors whose each direction computes its result and log-det in one pass."""
from __future__ import annotations

from tensorflow_probability.python.bijectors import bijector
from tensorflow_probability.python.internal import cache_util

from tfp_flows.bijectors._hash import HashedOnce


class OnePass:
    """Mixin for a `tfb.Bijector`. Subclasses give
    `_augmented_forward(z) -> (x, {"ildj": −log-det})` and
    `_augmented_inverse(x) -> (z, {"ildj": log-det of the inverse})`.

    TFP's greedy-attribute cache keeps the log-det with the result (as `ildj`, the
    key the base class reads), so `log_prob` and `sample_and_log_prob` run one
    pass, and their gradients take one path through it instead of two. The
    log-det methods recompute only for a point the transform has not seen.
    """

    _cache = cache_util.BijectorCacheWithGreedyAttrs(
        forward_name="_augmented_forward", inverse_name="_augmented_inverse"
    )

    def _forward(self, z):
        return self._augmented_forward(z)[0]

    def _inverse(self, x):
        return self._augmented_inverse(x)[0]

    def _forward_log_det_jacobian(self, z):
        return -self._augmented_forward(z)[1]["ildj"]

    def _inverse_log_det_jacobian(self, x):
        return self._augmented_inverse(x)[1]["ildj"]


class OnePassBijector(HashedOnce, OnePass, bijector.AutoCompositeTensorBijector):
    """A one-pass bijector whose parameters are all tensors (a composite tensor, as TFP's own)."""
