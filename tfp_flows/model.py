"""`FlowModel`: maximum-likelihood training of a flow with Keras `fit`."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras

from tfp_flows.checks import check_samples
from tfp_flows.export import export_distribution

tfb = tfp.bijectors
tfd = tfp.distributions

__all__ = ["FlowModel"]


def _is_keras3(obj) -> bool:
    return type(obj).__module__.split(".")[0] == "keras"


class _StopOnNonFinite(tf_keras.callbacks.Callback):
    """Raises a clear error at the end of an epoch whose NLL is NaN or inf.

    The training step never applies a non-finite gradient, so the weights the
    model holds when the error is raised are those of the last finite step.
    The check runs per epoch, not per batch: a batch-level hook would make
    Keras wait for every step before dispatching the next.
    """

    def on_epoch_end(self, epoch, logs=None):
        for key in ("nll", "val_nll"):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(float(value)):
                self.model.stop_training = True
                raise FloatingPointError(
                    f"FlowModel: the {key} became {value} in epoch {epoch + 1}. Non-finite steps "
                    "were not applied, so the weights are those of the last finite step; lower "
                    "the learning rate or check the data."
                )


class FlowModel(tf_keras.Model):
    """A trainable `tfd.TransformedDistribution(base, bijector)` for `tf_keras`.

    `compile()` builds in the loss, the negative log-likelihood
    `−mean log p(x)`; `fit(x)` takes data only and reports `nll` (nats per
    example) and `bits_per_dim` (`nll / (D · log 2)`, D the event size).
    The bijector maps base samples to data; it must own its `tf.Variable`s
    (e.g. a builder of `tfp_flows.flows`).
    """

    def __init__(
        self,
        bijector: tfb.Bijector,
        event_shape: Sequence[int],
        base_distribution: tfd.Distribution | None = None,
        name: str = "flow_model",
    ):
        super().__init__(name=name)
        if not isinstance(bijector, tfb.Bijector):
            raise TypeError(
                f"FlowModel expects a tfp.bijectors.Bijector; given {type(bijector).__name__}."
            )
        self._event_shape = tuple(int(d) for d in tf.TensorShape(event_shape).as_list())
        if base_distribution is None:
            # A Chain has no dtype of its own: take the one of its variables.
            floating = [v.dtype for v in bijector.variables if v.dtype.is_floating]
            dtype = bijector.dtype or (floating[0] if floating else tf.float32)
            base_distribution = tfd.Sample(
                tfd.Normal(tf.zeros([], dtype), tf.ones([], dtype)), self._event_shape
            )
        elif not isinstance(base_distribution, tfd.Distribution):
            raise TypeError(
                "base_distribution must be a tfp.distributions.Distribution; "
                f"given {type(base_distribution).__name__}."
            )
        if base_distribution.event_shape.as_list() != list(self._event_shape):
            raise ValueError(
                f"base_distribution has event shape {base_distribution.event_shape.as_list()}; "
                f"expected the model's event_shape {list(self._event_shape)}."
            )
        self.bijector = bijector
        self.base_distribution = base_distribution
        self._distribution = tfd.TransformedDistribution(base_distribution, bijector)
        self._event_size = int(np.prod(self._event_shape))
        self._nll = tf_keras.metrics.Mean(name="nll")
        self._bits_per_dim = tf_keras.metrics.Mean(name="bits_per_dim")
        # Build variables that Keras layers inside the bijector create lazily.
        # The forward direction is used so that data-dependent initialisations
        # (which run on the inverse, data → base) still see real data first.
        bijector.forward(tf.zeros((1,) + self._event_shape, base_distribution.dtype))

    @property
    def distribution(self) -> tfd.TransformedDistribution:
        """The flow's `tfd.TransformedDistribution` (base → data through the bijector)."""
        return self._distribution

    @property
    def event_shape(self) -> tuple:
        return self._event_shape

    @property
    def metrics(self):
        return [self._nll, self._bits_per_dim]

    def call(self, x, training=None):
        return self._distribution.log_prob(x)

    def log_prob(self, x):
        """`log p(x) = log p_base(f⁻¹(x)) + log|det ∂f⁻¹/∂x|` for `x` of shape `[N, *event_shape]`."""
        return self._distribution.log_prob(x)

    def sample(self, n: int, seed=None):
        """`n` samples `f(z)`, `z ~ base`."""
        return self._distribution.sample(n, seed=seed)

    def export(self, path: str) -> str:
        """Write a SavedModel with `log_prob`, `sample`, `forward`, `inverse` (see `export_distribution`)."""
        return export_distribution(self._distribution, path)

    def _record(self, nll):
        self._nll.update_state(nll)
        self._bits_per_dim.update_state(nll / (self._event_size * math.log(2.0)))
        return {m.name: m.result() for m in self.metrics}

    @staticmethod
    def _unpack(data):
        x, y, _ = tf_keras.utils.unpack_x_y_sample_weight(data)
        if y is not None:
            raise ValueError("FlowModel trains on data only: give `x`, not `(x, y)` pairs.")
        return x

    def train_step(self, data):
        x = self._unpack(data)
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(self._distribution.log_prob(x))
        gradients = tape.gradient(loss, variables)
        finite = tf.math.is_finite(loss)
        for g in gradients:
            if g is not None:
                finite = finite & tf.reduce_all(tf.math.is_finite(g))
        # A non-finite step is not applied (the callback then stops training).
        gradients = [g if g is None else tf.where(finite, g, tf.zeros_like(g)) for g in gradients]
        self.optimizer.apply_gradients(
            (g, v) for g, v in zip(gradients, variables) if g is not None
        )
        return self._record(loss)

    def test_step(self, data):
        return self._record(-tf.reduce_mean(self._distribution.log_prob(self._unpack(data))))

    def compile(
        self,
        optimizer="adam",
        jit_compile: bool = True,
        learning_rate: float | None = None,
        **kwargs,
    ):
        """Compile with the NLL loss built in. `learning_rate` sets Adam's step size."""
        if _is_keras3(optimizer):
            raise TypeError(
                "The optimizer is a Keras 3 object (`import keras`); FlowModel needs tf_keras "
                "(Keras 2) optimizers, e.g. tf_keras.optimizers.Adam."
            )
        if "loss" in kwargs:
            raise ValueError("FlowModel's loss is the negative log-likelihood; do not pass `loss`.")
        if learning_rate is not None:
            if not isinstance(optimizer, str):
                raise ValueError("Pass `learning_rate` only with an optimizer given by name.")
            optimizer = tf_keras.optimizers.get(
                {"class_name": optimizer, "config": {"learning_rate": learning_rate}}
            )
        super().compile(optimizer=optimizer, jit_compile=jit_compile, **kwargs)

    def _check_trainable(self) -> None:
        keras3 = [
            type(o).__qualname__ for o in self.bijector._flatten(predicate=_is_keras3)
        ]
        if keras3:
            raise TypeError(
                f"The bijector holds Keras 3 objects ({', '.join(sorted(set(keras3)))}); their "
                "variables are not tracked by TFP or tf_keras, so nothing would be trained. "
                "Build networks with `import tf_keras` instead of `import keras`."
            )
        tracked = {id(v) for v in self.trainable_variables}
        owned = list(self.bijector.trainable_variables) + list(
            self.base_distribution.trainable_variables
        )
        missing = [v.name for v in owned if id(v) not in tracked]
        if missing:
            raise RuntimeError(
                f"Keras does not track {len(missing)} trainable variable(s) of the flow "
                f"({', '.join(missing[:5])}); training would leave them unchanged."
            )
        if not self.trainable_variables:
            raise RuntimeError(
                "The flow has no trainable variables that Keras tracks: fit would train nothing. "
                "Give the bijector tf.Variables (see tfp_flows.flows) and use tf_keras, not keras 3."
            )

    def _checked_dataset(self, data: tf.data.Dataset, name: str) -> tf.data.Dataset:
        spec = data.element_spec
        if not isinstance(spec, tf.TensorSpec):
            raise ValueError(
                f"{name}: a dataset for FlowModel must yield single tensors of shape "
                f"[batch, {', '.join(map(str, self._event_shape))}]; given elements {spec}."
            )
        if not spec.shape[1:].is_compatible_with(self._event_shape):
            raise ValueError(
                f"{name}: dataset elements must have shape [batch, "
                f"{', '.join(map(str, self._event_shape))}]; given {spec.shape.as_list()}."
            )
        message = f"{name}: the dataset holds NaN or inf values."
        return data.map(lambda x: tf.debugging.assert_all_finite(x, message))

    def _batched(self, array: np.ndarray, batch_size: int, shuffle: bool) -> tf.data.Dataset:
        """Batches of equal size (the remainder is dropped when shuffling), so that
        XLA compiles the step for one shape only; a tensor, not an array, so that
        Keras does not cast float64 data to float32."""
        data = tf.data.Dataset.from_tensor_slices(tf.constant(array, self._distribution.dtype))
        if shuffle:
            data = data.shuffle(len(array), reshuffle_each_iteration=True)
        drop = shuffle and len(array) >= batch_size
        return data.batch(batch_size, drop_remainder=drop).prefetch(tf.data.AUTOTUNE)

    def fit(
        self,
        x=None,
        epochs: int = 1,
        batch_size: int | None = None,
        validation_split: float = 0.0,
        validation_data=None,
        patience: int | None = None,
        callbacks: Sequence[tf_keras.callbacks.Callback] | None = None,
        **kwargs,
    ):
        """Maximise the likelihood of `x` (a NumPy array or a `tf.data.Dataset`).

        Arrays are checked (shape, finiteness), shuffled each epoch and cut into
        batches of `batch_size` (default 32); `validation_split` holds out the last
        fraction of the rows, as Keras does.

        `patience=k` adds `EarlyStopping` on the validation NLL (the training NLL
        when there is no validation data) that restores the best weights.
        Other keyword arguments go to `tf_keras.Model.fit`.
        """
        if x is None:
            raise ValueError("FlowModel.fit needs data `x` of shape [N, *event_shape].")
        if "y" in kwargs:
            raise ValueError("FlowModel trains on data only; do not pass `y`.")
        if isinstance(validation_data, tuple) and len(validation_data) == 1:
            validation_data = validation_data[0]
        if isinstance(x, tf.data.Dataset):
            if validation_split:
                raise ValueError("validation_split needs array data; with a dataset give validation_data.")
            train = self._checked_dataset(x, "x")
        else:
            array = check_samples(x, self._event_shape, "x")
            if validation_split:
                # As Keras does: the last fraction of the rows, before any shuffling.
                held_out = int(len(array) * validation_split)
                if not 0 < held_out < len(array) or validation_data is not None:
                    raise ValueError(
                        "validation_split must hold out between 1 and N - 1 rows and cannot be "
                        f"combined with validation_data; given {validation_split} of {len(array)} rows."
                    )
                array, validation_data = array[:-held_out], array[-held_out:]
            train = self._batched(array, batch_size or 32, kwargs.pop("shuffle", True))
        if isinstance(validation_data, tf.data.Dataset):
            validation_data = self._checked_dataset(validation_data, "validation_data")
        elif validation_data is not None:
            held_out = check_samples(validation_data, self._event_shape, "validation_data")
            validation_data = self._batched(held_out, min(len(held_out), 8192), shuffle=False)
        if not self._is_compiled:
            self.compile()
        self._check_trainable()
        callbacks = list(callbacks or []) + [_StopOnNonFinite()]
        if patience is not None:
            monitor = "nll" if validation_data is None else "val_nll"
            callbacks.append(
                tf_keras.callbacks.EarlyStopping(
                    monitor=monitor, patience=int(patience), mode="min", restore_best_weights=True
                )
            )
        return super().fit(
            train, epochs=epochs, validation_data=validation_data, callbacks=callbacks, **kwargs
        )
