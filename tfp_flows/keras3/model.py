"""`FlowModel` for Keras 3: maximum-likelihood training of a flow layer with `keras.Model.fit`."""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_flows.checks import (
    check_fraction,
    check_integer,
    check_positive_integer,
    check_positive_number,
    check_samples,
    check_shape,
)
from tfp_flows.export import export_functions
from tfp_flows.keras3.layers import Chain, FlowLayer, is_tf_keras, refuse_tf_keras
from tfp_flows.model import DivergenceWarning, divergence_threshold
from tfp_flows.serialization import distribution_config, distribution_from_config

tfb = tfp.bijectors
tfd = tfp.distributions

__all__ = ["FlowModel"]


class _NonFiniteAndDivergence(keras.callbacks.Callback):
    """Epoch-level guard, as in `tfp_flows.FlowModel`.

    A non-finite training NLL raises `FloatingPointError` (those steps were not
    applied); a non-finite validation NLL stops training with a warning (best
    weights restored when early stopping keeps them); an epoch whose NLL exceeds
    `divergence_threshold` of the first epoch's warns once (`DivergenceWarning`).
    """

    def __init__(self, early_stopping=None):
        super().__init__()
        self._early_stopping = early_stopping
        self._first = None

    def on_train_begin(self, logs=None):
        self.model.diverged = False
        self._first = None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        nll = logs.get("nll")
        if nll is not None and not math.isfinite(float(nll)):
            self.model.stop_training = True
            raise FloatingPointError(
                f"FlowModel: the training NLL became {nll} in epoch {epoch + 1}. Non-finite steps "
                "were not applied, so the weights are those of the last finite step; lower the "
                "learning rate or check the data."
            )
        if nll is not None:
            if self._first is None:
                self._first = float(nll)
            elif not self.model.diverged and float(nll) > divergence_threshold(self._first):
                self.model.diverged = True
                warnings.warn(
                    f"FlowModel: training diverged: the NLL of epoch {epoch + 1} is {float(nll):.4g} "
                    f"nats against {self._first:.4g} in the first epoch. Lower the learning rate.",
                    DivergenceWarning, stacklevel=2)
        val = logs.get("val_nll")
        if val is not None and not math.isfinite(float(val)):
            self.model.stop_training = True
            restored = ""
            stopper = self._early_stopping
            if stopper is not None and stopper.restore_best_weights and stopper.best_weights:
                self.model.set_weights(stopper.best_weights)
                restored = f" The weights of the best epoch ({stopper.best_epoch + 1}) were restored."
            warnings.warn(
                f"FlowModel: the validation NLL became {val} in epoch {epoch + 1} (a held-out "
                f"point lies outside what the model learned); training stopped.{restored}",
                RuntimeWarning, stacklevel=2)


def _standard_normal(event_shape, dtype) -> tfd.Distribution:
    return tfd.Sample(tfd.Normal(tf.zeros([], dtype), tf.ones([], dtype)), list(event_shape))


def _as_flow(flow):
    """A `FlowLayer` or `Chain` from the `flow` argument (a list becomes a `Chain`)."""
    if isinstance(flow, (list, tuple)):
        return Chain(list(flow))
    if isinstance(flow, (FlowLayer, Chain)):
        return flow
    if is_tf_keras(flow) or isinstance(flow, tfb.Bijector):
        Chain([flow])  # raises the TypeError naming the right import
    raise TypeError(
        "`flow` must be a tfp_flows.keras3 flow layer (tfp_flows.keras3.flows builders), a "
        f"Chain of them, or a list of layers and fixed TFP bijectors; given {type(flow).__name__}."
    )


@keras.saving.register_keras_serializable(package="tfp_flows")
class FlowModel(keras.Model):
    """A trainable `tfd.TransformedDistribution(base, flow.bijector(context))` for Keras 3.

    The loss is built in: `−mean log p(x)` (or `−mean log p(x | c)` with
    `context_shape=[k]`); `fit(x)` (or `fit(x, context=c)`) logs `loss` and `nll`
    (nats per example, equal) and `bits_per_dim` (`nll / (D · log 2)`), with `val_`
    twins. `flow` is a `tfp_flows.keras3.flows` layer, a `Chain`, or a list of
    layers and fixed TFP bijectors; its Keras variables are the model's weights.
    """

    def __init__(
        self,
        flow,
        event_shape: Sequence[int],
        base_distribution: tfd.Distribution | None = None,
        context_shape: Sequence[int] | None = None,
        name: str = "flow_model",
        **kwargs,
    ):
        flow = _as_flow(flow)
        dtype = flow.flow_dtype
        super().__init__(name=name, dtype=dtype.name, **kwargs)
        self._event_shape = check_shape("event_shape", event_shape)
        self._context_shape = None if context_shape is None else check_shape(
            "context_shape", context_shape)
        if self._context_shape is not None and len(self._context_shape) != 1:
            raise ValueError(
                f"`context_shape` must be [k] (a context vector); given {list(self._context_shape)}."
            )
        if flow.context_size is None and self._context_shape is not None:
            raise ValueError(
                f"`context_shape`: given {list(self._context_shape)}, but no part of the flow takes "
                "a context (build flows with context_size=k)."
            )
        if flow.context_size is not None and (
                self._context_shape is None or self._context_shape[0] != flow.context_size):
            raise ValueError(
                f"`context_shape`: the flow takes a context of size {flow.context_size}; pass "
                f"context_shape=[{flow.context_size}] (given {self._context_shape})."
            )
        self._default_base = base_distribution is None
        if base_distribution is None:
            base_distribution = _standard_normal(self._event_shape, dtype)
        elif not isinstance(base_distribution, tfd.Distribution):
            raise TypeError(
                "`base_distribution` must be a tfp.distributions.Distribution; "
                f"given {type(base_distribution).__name__}."
            )
        elif base_distribution.variables:
            raise TypeError(
                "`base_distribution` holds tf.Variables, which Keras 3 would neither train nor "
                "save; give it constant parameters."
            )
        if base_distribution.event_shape.as_list() != list(self._event_shape):
            raise ValueError(
                f"`base_distribution` has event shape {base_distribution.event_shape.as_list()}; "
                f"expected the model's event_shape {list(self._event_shape)}."
            )
        if base_distribution.dtype != dtype:
            raise ValueError(
                f"`base_distribution` has dtype {base_distribution.dtype.name}; the flow's is "
                f"{dtype.name}."
            )
        self.flow = flow
        # TFP objects are kept out of Keras' attribute tracking (they hold no variables).
        object.__setattr__(self, "_base", base_distribution)
        self._event_size = int(np.prod(self._event_shape))
        self._loss_metric = keras.metrics.Mean(name="loss")
        self._nll_metric = keras.metrics.Mean(name="nll")
        self._bits_metric = keras.metrics.Mean(name="bits_per_dim")
        self.diverged = False
        self._auto_steps = True
        self.built = True

    # --- the distribution -------------------------------------------------------------

    @property
    def flow_dtype(self) -> tf.DType:
        return self._base.dtype

    @property
    def base_distribution(self) -> tfd.Distribution:
        return self._base

    @property
    def event_shape(self) -> tuple:
        return self._event_shape

    @property
    def context_shape(self) -> tuple | None:
        return self._context_shape

    def bijector(self, context=None) -> tfb.Bijector:
        """The flow's TFP bijector (base to data) for the current weights and `context`."""
        return self.flow.bijector(context)

    @property
    def distribution(self) -> tfd.TransformedDistribution:
        """`tfd.TransformedDistribution(base, bijector)` reading the current weights.

        Conditional models: `conditional_distribution(context)`.
        """
        if self._context_shape is not None:
            raise ValueError(
                "`distribution`: this FlowModel is conditional; use "
                "model.conditional_distribution(context).")
        return tfd.TransformedDistribution(self._base, self.flow.bijector(None))

    def conditional_distribution(self, context) -> tfd.TransformedDistribution:
        """The distribution of `x` given `context` `[N, k]` (batch shape `[N]`)."""
        context = self._checked_context(context, None)
        return tfd.TransformedDistribution(self._base, self.flow.bijector(context))

    def _checked_context(self, context, rows: int | None, name: str = "context"):
        if self._context_shape is None:
            if context is not None:
                raise ValueError(
                    f"`{name}`: this FlowModel is unconditional (no `context_shape`); given a context."
                )
            return None
        if context is None:
            raise ValueError(
                f"`{name}`: this FlowModel is conditional (context_shape="
                f"{list(self._context_shape)}); pass a context of shape [N, {self._context_shape[0]}]."
            )
        if isinstance(context, tf.Tensor) and not tf.executing_eagerly():
            return context
        array = check_samples(context, self._context_shape, name)
        if rows is not None and len(array) != rows:
            raise ValueError(
                f"`{name}` must have one row per example: expected {rows} rows; given {len(array)}."
            )
        return tf.constant(array, self.flow_dtype)

    def _log_prob(self, x, context):
        return tfd.TransformedDistribution(self._base, self.flow.bijector(context)).log_prob(x)

    def call(self, inputs, training=None):
        """`log p(x)` for `inputs = x`, or `log p(x | c)` for `inputs = (x, c)`."""
        if self._context_shape is None:
            return self._log_prob(inputs, None)
        x, context = inputs
        return self._log_prob(x, context)

    def compute_output_spec(self, inputs, training=None):
        x = inputs if self._context_shape is None else inputs[0]
        return keras.KerasTensor(x.shape[:1], dtype=self.flow_dtype.name)

    def log_prob(self, x, context=None):
        """`log p(x) = log p_base(f⁻¹(x)) + log|det ∂f⁻¹/∂x|` for `x` `[N, *event_shape]`."""
        if tf.executing_eagerly() and not isinstance(x, tf.Tensor):
            x = tf.constant(check_samples(x, self._event_shape, "x"), self.flow_dtype)
        rows = int(x.shape[0]) if x.shape.rank and x.shape[0] is not None else None
        return self._log_prob(x, self._checked_context(context, rows))

    def sample(self, n: int, context=None, seed=None):
        """`n` samples `f(z)`, `z ~ base`: `[n, *event_shape]`.

        Conditional: a context `[k]` gives `[n, *event_shape]`, a batch `[m, k]` gives
        `[n, m, *event_shape]`.
        """
        n = check_positive_integer("n", n)
        if self._context_shape is None:
            self._checked_context(context, None)
            return self.flow.bijector(None).forward(self._base.sample(n, seed=seed))
        single = context is not None and np.ndim(context) == 1
        context = self._checked_context(np.reshape(context, (1, -1)) if single else context, None)
        m = int(context.shape[0])
        z = self._base.sample(n * m, seed=seed)
        x = self.flow.bijector(tf.tile(context, [n, 1])).forward(z)
        x = tf.reshape(x, [n, m, *self._event_shape])
        return x[:, 0] if single else x

    def export(self, path: str) -> str:
        """Write a SavedModel with `log_prob`, `sample`, `forward`, `inverse` for plain TensorFlow.

        The same functions as `tfp_flows.FlowModel.export` (see `export_functions`).
        """
        def forward(z, context=None):
            return self.flow.bijector(context).forward(z)

        def inverse(x, context=None):
            return self.flow.bijector(context).inverse(x)

        def sample(n, context=None):
            if context is None:
                return forward(self._base.sample(n))
            m = tf.shape(context)[0]
            x = forward(self._base.sample(n * m), tf.tile(context, [n, 1]))
            return tf.reshape(x, tf.concat([[n, m], list(self._event_shape)], axis=0))

        return export_functions(
            path, [v.value for v in self.weights], self._event_shape, self.flow_dtype,
            self._log_prob if self._context_shape else (lambda x: self._log_prob(x, None)),
            sample, forward, inverse, self._context_shape,
        )

    # --- training ------------------------------------------------------------------------

    @property
    def metrics(self):
        return [self._loss_metric, self._nll_metric, self._bits_metric]

    def _record(self, nll):
        self._loss_metric.update_state(nll)
        self._nll_metric.update_state(nll)
        self._bits_metric.update_state(nll / (self._event_size * math.log(2.0)))
        return {m.name: m.result() for m in self.metrics}

    def _unpack(self, data):
        if self._context_shape is None:
            if isinstance(data, (tuple, list)):
                if len(data) != 1:
                    raise ValueError(
                        "FlowModel trains on data only: give `x`, not `(x, y)` pairs (a "
                        "conditional model takes `context_shape` and `fit(x, context=c)`)."
                    )
                data = data[0]
            return data, None
        if not isinstance(data, (tuple, list)) or len(data) != 2:
            raise ValueError(
                "A conditional FlowModel trains on `(x, context)` pairs; given a single tensor."
            )
        return data[0], data[1]

    def train_step(self, data):
        x, context = self._unpack(data)
        variables = self.trainable_variables
        replica = tf.distribute.get_replica_context()
        replicas = replica.num_replicas_in_sync
        if replicas == 1:
            nll, gradients = self._nll_and_gradients(x, context, replicas)
        else:
            nll, gradients = self._replica_step(x, context, replicas)
        bad = tf.cast(tf.logical_not(tf.math.is_finite(nll)), tf.int32)
        for g in gradients:
            if g is not None:
                bad += tf.cast(tf.logical_not(tf.reduce_all(tf.math.is_finite(g))), tf.int32)
        pairs = [(g, v) for g, v in zip(gradients, variables) if g is not None]
        # A non-finite step is skipped whole: weights, optimizer variables and iterations stay.
        if replicas == 1:
            tf.cond(bad == 0, lambda: self._apply(pairs), lambda: tf.constant(False))
        else:
            # Every replica skips or applies together; the cond runs in cross-replica
            # context because the optimizer's update there calls `merge_call`.
            bad = replica.all_reduce(tf.distribute.ReduceOp.SUM, bad)
            replica.merge_call(self._apply_across_replicas, args=(bad, pairs))
        return self._record(nll)

    def _nll_and_gradients(self, x, context, replicas):
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            nll = -tf.reduce_mean(self._log_prob(x, context))
            scaled = nll / replicas
        return nll, tape.gradient(scaled, variables)

    def _apply(self, pairs):
        self.optimizer.apply_gradients(pairs)
        return tf.constant(True)

    def _apply_across_replicas(self, strategy, bad, pairs):
        bad = strategy.experimental_local_results(bad)[0]

        def apply():
            strategy.extended.call_for_each_replica(self._apply, args=(pairs,))
            return tf.constant(True)

        tf.cond(bad == 0, apply, lambda: tf.constant(False))

    def test_step(self, data):
        x, context = self._unpack(data)
        return self._record(-tf.reduce_mean(self._log_prob(x, context)))

    def compile(
        self,
        optimizer="adam",
        jit_compile: bool = True,
        learning_rate: float | None = None,
        steps_per_execution: int | str = "epoch",
        **kwargs,
    ):
        """Compile with the NLL loss built in.

        `optimizer`: `"adam"` (always `keras.optimizers.Adam`, `learning_rate` its step
        size, finite and > 0) or a Keras 3 optimizer (with a float or a
        `keras.optimizers.schedules` learning rate). `steps_per_execution="epoch"`
        (default) runs a whole epoch's batches per call when training on arrays, as
        `tfp_flows.FlowModel` does; or an integer as in Keras.
        """
        refuse_tf_keras(optimizer, "optimizer", "keras.optimizers.Adam")
        if learning_rate is not None:
            learning_rate = check_positive_number("learning_rate", learning_rate)
        for key in ("loss", "metrics", "weighted_metrics", "loss_weights"):
            if kwargs.get(key) is not None:
                raise ValueError(
                    f"`{key}`: FlowModel's loss is the negative log-likelihood and it logs loss, "
                    f"nll and bits_per_dim; do not pass `{key}`."
                )
            kwargs.pop(key, None)
        if isinstance(optimizer, str):
            if optimizer.lower() != "adam":
                raise ValueError(
                    f"`optimizer`: by name only 'adam' (keras.optimizers.Adam); given {optimizer!r}. "
                    "Pass any other Keras 3 optimizer as an object."
                )
            optimizer = keras.optimizers.Adam(
                **({} if learning_rate is None else {"learning_rate": learning_rate}))
        elif learning_rate is not None:
            raise ValueError(
                "`learning_rate`: pass it only with an optimizer given by name; set it on the "
                f"{type(optimizer).__name__} object instead."
            )
        elif not isinstance(optimizer, keras.optimizers.Optimizer):
            raise TypeError(
                f"`optimizer` must be 'adam' or a keras.optimizers.Optimizer; given "
                f"{type(optimizer).__name__}."
            )
        schedule = getattr(optimizer, "_learning_rate", None)
        refuse_tf_keras(schedule, "learning_rate schedule", "keras.optimizers.schedules")
        if isinstance(schedule, keras.Variable):
            check_positive_number("learning_rate", float(keras.ops.convert_to_numpy(schedule)))
        self._compile_request = {"jit_compile": bool(jit_compile),
                                 "steps_per_execution": steps_per_execution}
        self._auto_steps = steps_per_execution == "epoch"
        steps = 1 if self._auto_steps else check_positive_integer(
            "steps_per_execution", steps_per_execution)
        if self.distribute_strategy.num_replicas_in_sync > 1:
            # One XLA cluster cannot span the replicas' devices: each replica's NLL and
            # gradients are compiled, the all-reduce and the update run as TF ops.
            self._auto_steps, steps = False, 1
            self._replica_step = tf.function(self._nll_and_gradients, jit_compile=jit_compile)
            jit_compile = False
        super().compile(optimizer=optimizer, jit_compile=jit_compile, steps_per_execution=steps,
                        **kwargs)

    def get_compile_config(self) -> dict | None:
        """The optimizer and `compile`'s own arguments, for `.keras` files."""
        if self.optimizer is None:
            return None
        return {"optimizer": keras.saving.serialize_keras_object(self.optimizer),
                **self._compile_request}

    def compile_from_config(self, config: dict) -> None:
        optimizer = keras.saving.deserialize_keras_object(config["optimizer"])
        self.compile(optimizer=optimizer, jit_compile=config["jit_compile"],
                     steps_per_execution=config["steps_per_execution"])
        self.optimizer.build(self.trainable_variables)

    def _dataset_checked(self, data: tf.data.Dataset, name: str) -> tf.data.Dataset:
        spec = data.element_spec
        event = "[batch, " + ", ".join(map(str, self._event_shape)) + "]"
        if self._context_shape is None:
            ok = isinstance(spec, tf.TensorSpec) and spec.shape[1:].is_compatible_with(
                self._event_shape)
            expected = f"single tensors of shape {event}"
        else:
            ok = (isinstance(spec, tuple) and len(spec) == 2
                  and all(isinstance(s, tf.TensorSpec) for s in spec)
                  and spec[0].shape[1:].is_compatible_with(self._event_shape)
                  and spec[1].shape[1:].is_compatible_with(self._context_shape))
            expected = f"(x, context) pairs of shapes {event}, [batch, {self._context_shape[0]}]"
        if not ok:
            raise ValueError(f"`{name}`: a dataset must yield {expected}; given elements {spec}.")
        message = f"`{name}`: the dataset holds NaN or inf values."
        dtype = self.flow_dtype

        def checked(*tensors):
            out = tuple(tf.debugging.assert_all_finite(tf.cast(t, dtype), message) for t in tensors)
            return out if len(out) > 1 else out[0]

        return data.map(checked)

    def _batched(self, arrays: tuple, batch_size: int, shuffle: bool) -> tf.data.Dataset:
        """Equal batches (the remainder dropped when shuffling): one shape for XLA."""
        tensors = tuple(tf.constant(a, self.flow_dtype) for a in arrays)
        data = tf.data.Dataset.from_tensor_slices(tensors if len(tensors) > 1 else tensors[0])
        rows = len(arrays[0])
        if shuffle:
            data = data.shuffle(rows, reshuffle_each_iteration=True)
        drop = shuffle and rows >= batch_size
        return data.batch(batch_size, drop_remainder=drop).prefetch(tf.data.AUTOTUNE)

    def _arrays(self, x, context, name: str, context_name: str) -> tuple:
        array = check_samples(x, self._event_shape, name)
        if self._context_shape is None:
            self._checked_context(context, None, context_name)
            return (array,)
        self._checked_context(context, len(array), context_name)
        return array, check_samples(context, self._context_shape, context_name)

    def _validation(self, validation_data):
        if isinstance(validation_data, tf.data.Dataset):
            return self._dataset_checked(validation_data, "validation_data")
        if self._context_shape is None:
            if isinstance(validation_data, tuple) and len(validation_data) == 1:
                validation_data = validation_data[0]
            if isinstance(validation_data, tuple):
                raise ValueError(
                    "`validation_data`: an unconditional FlowModel takes an array, not pairs.")
            held = self._arrays(validation_data, None, "validation_data", "validation context")
        else:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                raise ValueError("`validation_data`: a conditional FlowModel takes (x_val, c_val).")
            held = self._arrays(validation_data[0], validation_data[1], "validation_data[0]",
                                "validation_data[1]")
        return self._batched(held, min(len(held[0]), 8192), shuffle=False)

    def fit(
        self,
        x=None,
        epochs: int = 1,
        batch_size: int | None = None,
        validation_split: float = 0.0,
        validation_data=None,
        patience: int | None = None,
        callbacks: Sequence[keras.callbacks.Callback] | None = None,
        context=None,
        **kwargs,
    ):
        """Maximise the likelihood of `x` (an array, or a `tf.data.Dataset`).

        As `tfp_flows.FlowModel.fit`: arrays (and `context` rows) are checked, shuffled
        each epoch and cut into equal batches of `batch_size` (default 32);
        `validation_split` holds out the last fraction of the rows; `validation_data`
        is an array (or `(x_val, c_val)`) or a dataset; `patience=k` adds
        `keras.callbacks.EarlyStopping` on `val_loss` (`loss` without validation data)
        restoring the best weights; data-dependent initialisations run on the first
        training batch. Other keyword arguments go to `keras.Model.fit`.
        """
        if x is None:
            raise ValueError("`x`: FlowModel.fit needs data of shape [N, *event_shape].")
        if "y" in kwargs:
            raise ValueError("`y`: FlowModel trains on data only; do not pass `y`.")
        epochs = check_positive_integer("epochs", epochs)
        if batch_size is not None:
            batch_size = check_positive_integer("batch_size", batch_size)
        validation_split = check_fraction("validation_split", validation_split)
        if patience is not None:
            patience = check_integer("patience", patience, minimum=0)
        callbacks = list(callbacks or [])
        for callback in callbacks:
            refuse_tf_keras(callback, "callbacks", "keras.callbacks")
        shuffle = kwargs.pop("shuffle", True)
        if not isinstance(shuffle, bool):
            raise TypeError(f"`shuffle` must be True or False; given {shuffle!r}.")

        steps = None
        if isinstance(x, tf.data.Dataset):
            if validation_split:
                raise ValueError(
                    "`validation_split` needs array data; with a dataset give validation_data.")
            if context is not None:
                raise ValueError("`context`: with a dataset, give (x, context) pairs in it.")
            train = self._dataset_checked(x, "x")
        else:
            arrays = self._arrays(x, context, "x", "context")
            if validation_split:
                held_out = int(len(arrays[0]) * validation_split)
                if not 0 < held_out < len(arrays[0]) or validation_data is not None:
                    raise ValueError(
                        "`validation_split` must hold out between 1 and N - 1 rows and cannot be "
                        f"combined with validation_data; given {validation_split} of "
                        f"{len(arrays[0])} rows."
                    )
                validation_data = tuple(a[-held_out:] for a in arrays)
                arrays = tuple(a[:-held_out] for a in arrays)
            batch_size = batch_size or 32
            train = self._batched(arrays, batch_size, shuffle)
            rows = len(arrays[0])
            steps = rows // batch_size if shuffle and rows >= batch_size else math.ceil(rows / batch_size)
        if validation_data is not None:
            validation_data = self._validation(validation_data)

        if self.optimizer is None:
            self.compile()
        if not self.trainable_variables:
            raise RuntimeError("The flow has no trainable variables: fit would train nothing.")
        self._initialize_from(train)
        if not self.optimizer.built:
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trainable_variables)
        if self._auto_steps:
            wanted = max(1, min(steps or 1, 1000))
            if wanted != self.steps_per_execution:
                self.steps_per_execution = wanted
                self.train_function = None

        early_stopping = None
        if patience is not None:
            monitor = "loss" if validation_data is None else "val_loss"
            early_stopping = keras.callbacks.EarlyStopping(
                monitor=monitor, patience=patience, mode="min", restore_best_weights=True)
            callbacks.append(early_stopping)
        callbacks.append(_NonFiniteAndDivergence(early_stopping))
        return super().fit(train, epochs=epochs, validation_data=validation_data,
                           callbacks=callbacks, shuffle=False, **kwargs)

    def _initialize_from(self, train: tf.data.Dataset) -> None:
        """Run the flow's data-dependent initialisations on the first training batch."""
        if not self.flow.needs_initialization:
            return
        x, context = self._unpack(next(iter(train)))
        self.flow.initialize(x, context)

    # --- configuration --------------------------------------------------------------------

    def get_config(self) -> dict:
        """The flow layer's configuration, shapes, base distribution and name."""
        return {
            "flow": keras.saving.serialize_keras_object(self.flow),
            "event_shape": list(self._event_shape),
            "base_distribution": None if self._default_base else distribution_config(self._base),
            "context_shape": None if self._context_shape is None else list(self._context_shape),
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        base = config.get("base_distribution")
        return cls(
            keras.saving.deserialize_keras_object(config["flow"], custom_objects=custom_objects),
            config["event_shape"],
            base_distribution=None if base is None else distribution_from_config(base),
            context_shape=config.get("context_shape"),
            name=config.get("name", "flow_model"),
        )
