"""Callbacks that time each epoch of `fit` (epoch-level hooks only, so Keras keeps
running a whole epoch per compiled call): `EpochClock` for tf_keras, `Keras3EpochClock`
for Keras 3."""
from __future__ import annotations

import time

import keras
import tf_keras


class _EpochTiming:
    """`seconds`: the wall time of each epoch of the latest `fit` call. The first runs
    from its `on_epoch_begin` to its `on_epoch_end`; every later one from the previous
    epoch's `on_epoch_end` to its own, so that it holds all of Keras' work between
    epochs too (the metrics' reset, the data handler, the epoch-begin hooks)."""

    def on_train_begin(self, logs=None):
        self.seconds = []
        self._last_end = None

    def on_epoch_begin(self, epoch, logs=None):
        if self._last_end is None:
            self._last_end = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        now = time.perf_counter()
        self.seconds.append(now - self._last_end)
        self._last_end = now


class EpochClock(_EpochTiming, tf_keras.callbacks.Callback):
    """The epoch clock for tf_keras' `fit`."""


class Keras3EpochClock(_EpochTiming, keras.callbacks.Callback):
    """The epoch clock for Keras 3's `fit`."""
