"""`FlowModel` for Keras 3: maximum-likelihood training of a flow layer with `keras.Model.fit`."""
from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_flows.checks import check_positive_integer, check_positive_number
from tfp_flows.keras3.layers import Chain, FlowLayer, is_tf_keras, refuse_tf_keras
from tfp_flows.serialization import distribution_config, distribution_from_config
from tfp_flows.training import (
    EpochGuard,
    FlowTraining,
    all_finite,
    check_base_distribution,
    checked_shapes,
    standard_normal,
    steps_per_execution_for,
)

tfb = tfp.bijectors
tfd = tfp.distributions

__all__ = ["FlowModel"]


class _NonFiniteAndDivergence(EpochGuard, keras.callbacks.Callback):
    """`EpochGuard` (as in `tfp_flows.FlowModel`) as a Keras 3 callback."""


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
class FlowModel(FlowTraining, keras.Model):
    """A trainable `tfd.TransformedDistribution(base, flow.bijector(context))` for Keras 3.

    The loss is built in: `−mean log p(x)` (or `−mean log p(x | c)` with
    `context_shape=[k]`); `fit(x)` (or `fit(x, context=c)`) logs `loss` and `nll`
    (nats per example, equal) and `bits_per_dim` (`nll / (D · log 2)`), with `val_`
    twins. `flow` is a `tfp_flows.keras3.flows` layer, a `Chain`, or a list of
    layers and fixed TFP bijectors; its Keras variables are the model's weights.
    """

    _early_stopping_class = keras.callbacks.EarlyStopping
    _guard_class = _NonFiniteAndDivergence
    _casts_datasets = True

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
        self._event_shape, self._context_shape = checked_shapes(event_shape, context_shape)
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
            base_distribution = standard_normal(self._event_shape, dtype)
        check_base_distribution(base_distribution, self._event_shape)
        if base_distribution.variables:
            raise TypeError(
                "`base_distribution` holds tf.Variables, which Keras 3 would neither train nor "
                "save; give it constant parameters."
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
    def base_distribution(self) -> tfd.Distribution:
        return self._base

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

    def _log_prob(self, x, context):
        return tfd.TransformedDistribution(self._base, self.flow.bijector(context)).log_prob(x)

    def compute_output_spec(self, inputs, training=None):
        x = inputs if self._context_shape is None else inputs[0]
        return keras.KerasTensor(x.shape[:1], dtype=self.flow_dtype.name)

    def _forward(self, z, context=None):
        return self.flow.bijector(context).forward(z)

    def _inverse(self, x, context=None):
        return self.flow.bijector(context).inverse(x)

    def _export_variables(self) -> list:
        return [v.value for v in self.weights]

    # --- training ------------------------------------------------------------------------

    @property
    def metrics(self):
        return [self._loss_metric, self._nll_metric, self._bits_metric]

    def train_step(self, data):
        replica = tf.distribute.get_replica_context()
        replicas = replica.num_replicas_in_sync
        nll, finite, pairs = self._gradients(data, replicas)
        # A non-finite step is skipped whole: weights, optimizer variables and iterations stay.
        if replicas == 1:
            tf.cond(finite, lambda: self._apply(pairs), lambda: tf.constant(False))
        else:
            # Every replica skips or applies together; the cond runs in cross-replica
            # context because the optimizer's update there calls `merge_call`.
            bad = replica.all_reduce(tf.distribute.ReduceOp.SUM,
                                     tf.cast(tf.logical_not(finite), tf.int32))
            replica.merge_call(self._apply_across_replicas, args=(bad, pairs))
        return self._record(nll)

    def _runs_own_train_step(self) -> bool:
        return type(self).train_step is FlowModel.train_step

    def make_train_function(self, force: bool = False):
        """Keras 3's train function; for a large model its step is `_split_step`, two XLA
        programs (Keras' wrapper around the step then runs without XLA of its own)."""
        if self.train_function is not None and not force:
            return self.train_function
        if not self._splits_step():
            return super().make_train_function(force)
        jit_compile = self.jit_compile
        self.jit_compile = False
        try:
            self.train_function = self._make_function(self._split_step())
        finally:
            self.jit_compile = jit_compile
        return self.train_function

    def _gradients(self, data, replicas: int = 1) -> tuple:
        """`(nll, finite, pairs)`: the replica's batch NLL, the (gradient, variable) pairs
        of NLL / replicas, and whether the NLL and every gradient entry are finite."""
        x, context = self._unpack(data)
        nll_and_gradients = self._nll_and_gradients if replicas == 1 else self._replica_step
        nll, gradients = nll_and_gradients(x, context, replicas)
        pairs = [(g, v) for g, v in zip(gradients, self.trainable_variables) if g is not None]
        return nll, all_finite([nll] + [g for g, _ in pairs]), pairs

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
        (default) runs a whole epoch's batches per call when the epoch's length is
        known, as `tfp_flows.FlowModel` does; or an integer, which must divide the
        epoch's steps (Keras 3 runs every call whole).
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
        return self._fit(x, epochs, batch_size, validation_split, validation_data, patience,
                         callbacks, context, kwargs)

    def _refuse_callback(self, callback) -> None:
        refuse_tf_keras(callback, "callbacks", "keras.callbacks")

    def _prepare_fit(self, train: tf.data.Dataset, epoch_steps: int | None) -> None:
        """Compile if needed, check there is something to train and that the calls fit the
        epoch, run the flow's data-dependent initialisations on the first training batch,
        build the optimizer; under `steps_per_execution="epoch"` set the steps per call."""
        if self.optimizer is None:
            self.compile()
        if (not self._auto_steps and epoch_steps is not None
                and epoch_steps % self.steps_per_execution):
            # Keras 3 runs every call whole: one crossing the epoch's end would take the
            # next epoch's batches (or run past the data), silently.
            raise ValueError(
                f"`steps_per_execution` must divide the {epoch_steps} steps of an epoch "
                "(Keras 3 runs whole calls, so the last would run into the next epoch); "
                f"given {self.steps_per_execution}. Use a divisor of {epoch_steps}, or "
                "'epoch'."
            )
        if not self.trainable_variables:
            raise RuntimeError("The flow has no trainable variables: fit would train nothing.")
        if self.flow.needs_initialization:
            self.flow.initialize(*self._first_batch(train))
        if not self.optimizer.built:
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trainable_variables)
        if self._auto_steps:
            steps = steps_per_execution_for(epoch_steps)
            if steps != self.steps_per_execution:
                self.steps_per_execution = steps
                self.train_function = None

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
