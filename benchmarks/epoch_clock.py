"""A tf_keras callback that times each epoch of `fit` (epoch-level hooks only, so Keras
keeps running a whole epoch per compiled call)."""
from __future__ import annotations

import time

import tf_keras


class EpochClock(tf_keras.callbacks.Callback):
    """`seconds`: the wall time of each epoch of the latest `fit` call, from
    `on_epoch_begin` to `on_epoch_end`."""

    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.start)
