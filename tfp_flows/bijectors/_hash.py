"""A bijector hash computed once per instance."""
from __future__ import annotations


class HashedOnce:
    """Mixin for a `tfb.Bijector` (placed before it in the bases): `hash(b)` computed once.

    TFP keys its bijector cache by the bijector, and `Bijector.__hash__` walks the whole
    parameter structure (every nested bijector, NumPy constants through their string
    form) at each lookup: about 0.2 s of the 1.5 s that a Glow's first `fit` spends
    initialising and tracing (16x16x3, 2 x 4 steps). The parameters are fixed at
    construction (tensors and variables hash by identity), so the value never changes;
    equality is TFP's `Bijector.__eq__`.
    """

    def __hash__(self) -> int:
        value = self.__dict__.get("_hashed_once")
        if value is None:
            value = super().__hash__()
            self.__dict__["_hashed_once"] = value
        return value
