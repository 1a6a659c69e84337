"""`FlowModel`: maximum-likelihood training of a flow with tf_keras `fit`, and every Keras route."""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras

from tfp_flows import routing
from tfp_flows.checks import (
    check_fraction,
    check_integer,
    check_positive_integer,
    check_positive_number,
    check_samples,
    check_shape,
)
from tfp_flows.export import export_functions
from tfp_flows.serialization import (
    NotRebuildableError,
    bijector_config,
    bijector_from_config,
    distribution_config,
    distribution_from_config,
)

tfb = tfp.bijectors
tfd = tfp.distributions

__all__ = ["DivergenceWarning", "FlowModel"]

# Routes that save any flow, named in the error of the routes that need a configuration.
_ROUTES_FOR_ANY_FLOW = (
    "model.save_weights(...) / load_weights (.weights.h5 or TF checkpoint), "
    "ModelCheckpoint(..., save_weights_only=True), or model.export(path) (a SavedModel for "
    "plain TensorFlow)"
)


class DivergenceWarning(UserWarning):
    """An epoch ended with a training NLL far above the first epoch's."""


def divergence_threshold(first_nll: float) -> float:
    """Training has diverged when an epoch's NLL exceeds `first + max(10, |first| / 2)` nats."""
    return first_nll + max(10.0, 0.5 * abs(first_nll))


def _is_keras3(obj) -> bool:
    return type(obj).__module__.split(".")[0] == "keras"


def _refuse_keras3(obj, argument: str, module: str) -> None:
    """Refuse a Keras 3 object, naming its equivalent `tf_keras.<module>.<class>`."""
    if not _is_keras3(obj):
        return
    namespace = tf_keras
    for part in module.split("."):
        namespace = getattr(namespace, part)
    name = type(obj).__name__
    equivalent = (f"tf_keras.{module}.{name}" if hasattr(namespace, name)
                  else f"the matching class of tf_keras.{module}")
    raise TypeError(
        f"`{argument}` is a Keras 3 object ({type(obj).__module__}.{name}; on TF >= 2.16 "
        f"`tf.keras` is Keras 3). tfp_flows.FlowModel is a tf_keras model: use {equivalent} "
        "(import tf_keras), or train with `from tfp_flows.keras3 import FlowModel`."
    )


class _NonFiniteAndDivergence(tf_keras.callbacks.Callback):
    """Epoch-level guard: non-finite NLLs and divergence.

    A non-finite training NLL raises `FloatingPointError` (the non-finite steps were
    not applied). A non-finite validation NLL ends training gracefully: a warning,
    the best weights restored when early stopping keeps them, and `fit` returns its
    history. An epoch whose training NLL exceeds `divergence_threshold` of the first
    epoch's warns once (`DivergenceWarning`) and sets `model.diverged`.
    The checks run per epoch: a batch-level hook would make Keras wait on every step.
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
                    f"nats against {self._first:.4g} in the first epoch (threshold: first + "
                    "max(10, |first|/2)). Lower the learning rate.",
                    DivergenceWarning, stacklevel=2,
                )
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
                RuntimeWarning, stacklevel=2,
            )


@tf_keras.utils.register_keras_serializable(package="tfp_flows")
class _RunningMean(tf_keras.metrics.Mean):
    """A running mean whose sums stay out of saved files: they restart every epoch, and
    tf_keras cannot restore a metric's (sync-on-read) sums inside a strategy's scope."""

    def save_own_variables(self, store):
        pass

    def load_own_variables(self, store):
        pass


def _standard_normal(event_shape, dtype) -> tfd.Distribution:
    return tfd.Sample(tfd.Normal(tf.zeros([], dtype), tf.ones([], dtype)), list(event_shape))


@tf_keras.utils.register_keras_serializable(package="tfp_flows")
class FlowModel(tf_keras.Model):
    """A trainable `tfd.TransformedDistribution(base, bijector)` for `tf_keras`.

    The loss is built in: the negative log-likelihood `−mean log p(x)` (or
    `−mean log p(x | c)` with `context_shape=[k]`). `fit(x)` (or `fit(x, context=c)`)
    takes data only and logs `loss` and `nll` (nats per example, equal) and
    `bits_per_dim` (`nll / (D · log 2)`), with `val_` twins, so every callback works
    with its default monitor. The bijector maps base samples to data and owns its
    variables (the builders of `tfp_flows.flows`, TFP's bijectors, chains of them);
    they are the model's weights, so every Keras save route keeps them.
    """

    def __init__(
        self,
        bijector: tfb.Bijector,
        event_shape: Sequence[int],
        base_distribution: tfd.Distribution | None = None,
        context_shape: Sequence[int] | None = None,
        name: str = "flow_model",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        if type(bijector).__module__.startswith("tfp_flows.keras3"):
            raise TypeError(
                f"`bijector` is a Keras 3 flow layer ({type(bijector).__name__}); train it with "
                "`from tfp_flows.keras3 import FlowModel`, or build the flow with tfp_flows.flows."
            )
        if not isinstance(bijector, tfb.Bijector):
            raise TypeError(
                "`bijector` must be a tfp.bijectors.Bijector (e.g. from tfp_flows.flows); "
                f"given {type(bijector).__name__}."
            )
        self._event_shape = check_shape("event_shape", list(tf.TensorShape(event_shape).as_list())
                                        if isinstance(event_shape, tf.TensorShape) else event_shape)
        self._context_shape = None if context_shape is None else check_shape(
            "context_shape", context_shape)
        if self._context_shape is not None and len(self._context_shape) != 1:
            raise ValueError(
                f"`context_shape` must be [k] (a context vector); given {list(self._context_shape)}."
            )
        if base_distribution is None:
            floating = [v.dtype for v in bijector.variables if v.dtype.is_floating]
            dtype = bijector.dtype or (floating[0] if floating else tf.float32)
            base_distribution = _standard_normal(self._event_shape, dtype)
            self._default_base = True
        elif not isinstance(base_distribution, tfd.Distribution):
            raise TypeError(
                "`base_distribution` must be a tfp.distributions.Distribution; "
                f"given {type(base_distribution).__name__}."
            )
        else:
            self._default_base = False
        if base_distribution.event_shape.as_list() != list(self._event_shape):
            raise ValueError(
                f"`base_distribution` has event shape {base_distribution.event_shape.as_list()}; "
                f"expected the model's event_shape {list(self._event_shape)}."
            )
        routing.check_conditioning(bijector, self._context_shape)
        self.bijector = bijector
        self.base_distribution = base_distribution
        self._distribution = tfd.TransformedDistribution(base_distribution, bijector)
        self._event_size = int(np.prod(self._event_shape))
        # Held outside Keras' attribute tracking: the metrics' running sums are not weights
        # of the flow (they would enter save_weights, get_weights and count_params).
        object.__setattr__(self, "_tracked_metrics", [
            _RunningMean(name=name) for name in ("loss", "nll", "bits_per_dim")])
        self.diverged = False
        # Build what Keras layers inside a TFP bijector create lazily, then make every
        # variable of the flow a weight of the model (so save_weights, .keras, SavedModel
        # and checkpoints hold them) in a fixed order.
        self._bijector_call(bijector.forward, tf.zeros((1, *self._event_shape), self.flow_dtype),
                            self._zeros_context(1))
        self._flow_weights = list(self._distribution.variables)
        spec = tf.TensorSpec([None, *self._event_shape], self.flow_dtype)
        if self._context_shape is not None:
            spec = (spec, tf.TensorSpec([None, *self._context_shape], self.flow_dtype))
        self._set_save_spec(spec)
        self.built = True

    # --- the distribution -------------------------------------------------------------

    @property
    def flow_dtype(self) -> tf.DType:
        """The flow's floating dtype (the base distribution's)."""
        return self.base_distribution.dtype

    @property
    def distribution(self) -> tfd.TransformedDistribution:
        """The flow's `tfd.TransformedDistribution` (base → data through the bijector).

        For a conditional model pass `bijector_kwargs=model.bijector_kwargs(context)`.
        """
        return self._distribution

    @property
    def event_shape(self) -> tuple:
        return self._event_shape

    @property
    def context_shape(self) -> tuple | None:
        return self._context_shape

    def bijector_kwargs(self, context) -> dict:
        """The keyword arguments that route `context` to every conditional part of the bijector."""
        return routing.bijector_kwargs(self.bijector, context)

    def _zeros_context(self, rows: int):
        if self._context_shape is None:
            return None
        return tf.zeros((rows, *self._context_shape), self.flow_dtype)

    def _bijector_call(self, method, x, context):
        return method(x, **routing.bijector_kwargs(self.bijector, context))

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
        return self._distribution.log_prob(
            x, bijector_kwargs=routing.bijector_kwargs(self.bijector, context))

    def call(self, inputs, training=None):
        """`log p(x)` for `inputs = x`, or `log p(x | c)` for `inputs = (x, c)`."""
        if self._context_shape is None:
            return self._log_prob(inputs, None)
        x, context = inputs
        return self._log_prob(x, context)

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
            return self._distribution.sample(n, seed=seed)
        single = context is not None and np.ndim(context) == 1
        context = self._checked_context(
            np.reshape(context, (1, -1)) if single else context, None)
        m = int(context.shape[0])
        z = self.base_distribution.sample(n * m, seed=seed)
        x = self._bijector_call(self.bijector.forward, z, tf.tile(context, [n, 1]))
        x = tf.reshape(x, [n, m, *self._event_shape])
        return x[:, 0] if single else x

    def export(self, path: str) -> str:
        """Write a SavedModel with `log_prob`, `sample`, `forward`, `inverse` for plain TensorFlow.

        Conditional models' functions take the context too (see `export_functions`).
        """
        def forward(z, context=None):
            return self._bijector_call(self.bijector.forward, z, context)

        def inverse(x, context=None):
            return self._bijector_call(self.bijector.inverse, x, context)

        def sample(n, context=None):
            if context is None:
                return self._distribution.sample(n)
            m = tf.shape(context)[0]
            z = self.base_distribution.sample(n * m)
            x = forward(z, tf.tile(context, [n, 1]))
            return tf.reshape(x, tf.concat([[n, m], list(self._event_shape)], axis=0))

        return export_functions(
            path, self._distribution.variables, self._event_shape, self.flow_dtype,
            self._log_prob if self._context_shape else (lambda x: self._log_prob(x, None)),
            sample, forward, inverse, self._context_shape,
        )

    # --- training ------------------------------------------------------------------------

    @property
    def metrics(self):
        return list(self._tracked_metrics)

    def _record(self, nll):
        loss, mean_nll, bits_per_dim = self._tracked_metrics
        loss.update_state(nll)
        mean_nll.update_state(nll)
        bits_per_dim.update_state(nll / (self._event_size * math.log(2.0)))
        return {m.name: m.result() for m in self._tracked_metrics}

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
        with tf.GradientTape() as tape:
            nll = -tf.reduce_mean(self._log_prob(x, context))
            scaled = nll / replica.num_replicas_in_sync
        gradients = tape.gradient(scaled, variables)
        pairs = [(g, v) for g, v in zip(gradients, variables) if g is not None]
        # Gradients summed over replicas here (the optimizer then skips its own sum), so
        # that every replica sees the same sums and takes the same decision.
        total, *summed = replica.all_reduce(tf.distribute.ReduceOp.SUM,
                                            [scaled] + [g for g, _ in pairs])
        finite = tf.math.is_finite(total)
        for g in summed:
            finite = finite & tf.reduce_all(tf.math.is_finite(g))
        tf.__internal__.distribute.interim.maybe_merge_call(
            self._apply_if_finite, self.distribute_strategy, finite,
            list(zip(summed, [v for _, v in pairs])))
        return self._record(nll)

    def _apply_if_finite(self, strategy, finite, grads_and_vars) -> None:
        """Apply the step, or skip it whole when `finite` is false (weights, optimizer slots
        and `iterations` stay). Under strategies that synchronise by `merge_call` this runs
        in cross-replica context: a replica cannot synchronise inside a branch of its own."""
        def apply_gradients(pairs):
            self.optimizer.apply_gradients(pairs, experimental_aggregate_gradients=False)

        if tf.distribute.in_cross_replica_context():
            finite = strategy.experimental_local_results(finite)[0]

            def apply():
                strategy.extended.call_for_each_replica(apply_gradients, args=(grads_and_vars,))
                return tf.constant(True)
        else:
            def apply():
                apply_gradients(grads_and_vars)
                return tf.constant(True)

        tf.cond(finite, apply, lambda: tf.constant(False))

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

        `optimizer`: a name or a tf_keras optimizer; by name it is always the same
        class (`tf_keras.optimizers.get(name)`, e.g. `tf_keras.optimizers.Adam`),
        `learning_rate` setting its step size (finite, > 0). `steps_per_execution`:
        `"epoch"` (default) runs a whole epoch's batches in one compiled call when
        training on arrays (Keras' progress bar and epoch-level callbacks unchanged;
        batch-level callbacks then see one call per epoch), or an integer as in Keras.
        """
        if kwargs.pop("from_serialized", False):
            # tf_keras' SavedModel-folder loader recompiles with a fresh optimizer.
            warnings.warn(
                "FlowModel loaded from a SavedModel folder: weights and configuration are "
                "restored, the optimizer's state (Adam's moments, iterations) is not (tf_keras "
                "does not restore optimizer slots from that format). To resume training with "
                "its state, save as `.keras` or with tf.train.Checkpoint / ModelCheckpoint.",
                RuntimeWarning, stacklevel=2,
            )
        _refuse_keras3(optimizer, "optimizer", "optimizers")
        if learning_rate is not None:
            _refuse_keras3(learning_rate, "learning_rate", "optimizers.schedules")
            if not isinstance(learning_rate, tf_keras.optimizers.schedules.LearningRateSchedule):
                learning_rate = check_positive_number("learning_rate", learning_rate)
        if kwargs.get("loss") is not None:
            raise ValueError(
                "`loss`: FlowModel's loss is the negative log-likelihood; do not pass `loss`."
            )
        kwargs.pop("loss", None)
        for metric in tf.nest.flatten(kwargs.get("metrics") or []):
            _refuse_keras3(metric, "metrics", "metrics")
        if isinstance(optimizer, str):
            optimizer = tf_keras.optimizers.get(optimizer)
            if learning_rate is not None:
                optimizer.learning_rate = learning_rate
        elif learning_rate is not None:
            raise ValueError(
                "`learning_rate`: pass it only with an optimizer given by name; set it on the "
                f"{type(optimizer).__name__} object instead."
            )
        elif not isinstance(optimizer, (tf_keras.optimizers.Optimizer,
                                        tf_keras.optimizers.legacy.Optimizer)):
            raise TypeError(
                "`optimizer` must be a name or a tf_keras optimizer; given "
                f"{type(optimizer).__name__}."
            )
        rate = getattr(optimizer, "_learning_rate", None)
        _refuse_keras3(rate, "learning_rate schedule", "optimizers.schedules")
        if isinstance(rate, tf.Variable):
            check_positive_number("learning_rate", float(rate.numpy()))
        self._auto_steps = steps_per_execution == "epoch"
        if not self._auto_steps:
            kwargs["steps_per_execution"] = check_positive_integer(
                "steps_per_execution", steps_per_execution)
        strategy = self.distribute_strategy
        devices = strategy.extended.worker_devices if strategy.num_replicas_in_sync > 1 else ()
        if jit_compile and any(tf.DeviceSpec.from_string(d).device_type == "CPU" for d in devices):
            warnings.warn(
                "FlowModel: XLA compiles no cross-replica step on CPU devices (TensorFlow has no "
                "XLA collectives for CPUs, and replicas on logical CPUs of one process share "
                f"no XLA device) ({', '.join(devices)}): compiling without XLA (jit_compile=False).",
                RuntimeWarning, stacklevel=2)
            jit_compile = False
        super().compile(optimizer=optimizer, jit_compile=jit_compile, **kwargs)

    def compile_from_config(self, config):
        config = tf_keras.utils.deserialize_keras_object(config) if "class_name" in config else config
        optimizer = config.get("optimizer")
        if isinstance(optimizer, dict):
            optimizer = tf_keras.optimizers.deserialize(optimizer)
        jit_compile = config.get("jit_compile")
        self.compile(optimizer=optimizer or "adam",
                     jit_compile=True if jit_compile is None else bool(jit_compile),
                     steps_per_execution=(config.get("steps_per_execution") or 1) > 1
                     and config["steps_per_execution"] or "epoch")
        if self.built and hasattr(self.optimizer, "build"):
            self.optimizer.build(self.trainable_variables)

    def _check_trainable(self) -> None:
        keras3 = [type(o).__qualname__ for o in self.bijector._flatten(predicate=_is_keras3)]
        if keras3:
            raise TypeError(
                f"`bijector` holds Keras 3 objects ({', '.join(sorted(set(keras3)))}); their "
                "variables are not tracked by TFP or tf_keras, so nothing would be trained. "
                "Build networks with `import tf_keras`, or use tfp_flows.keras3."
            )
        tracked = {id(v) for v in self.trainable_variables}
        missing = [v.name for v in self._distribution.trainable_variables if id(v) not in tracked]
        if missing:
            raise RuntimeError(
                f"Keras does not track {len(missing)} trainable variable(s) of the flow "
                f"({', '.join(missing[:5])}); training would leave them unchanged."
            )
        if not self.trainable_variables:
            raise RuntimeError(
                "The flow has no trainable variables: fit would train nothing. Give the "
                "bijector tf.Variables (see tfp_flows.flows)."
            )

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
        dtypes = [s.dtype for s in tf.nest.flatten(spec)]
        if any(d != self.flow_dtype for d in dtypes):
            raise TypeError(
                f"`{name}`: a dataset must yield {self.flow_dtype.name} tensors (the flow's "
                f"dtype); given {', '.join(d.name for d in dtypes)}."
            )
        message = f"`{name}`: the dataset holds NaN or inf values."
        return data.map(lambda *t: tuple(tf.debugging.assert_all_finite(a, message) for a in t)
                        if len(t) > 1 else tf.debugging.assert_all_finite(t[0], message))

    def _batched(self, arrays: tuple, batch_size: int, shuffle: bool) -> tf.data.Dataset:
        """Batches of equal size (the remainder is dropped when shuffling), so that
        XLA compiles the step for one shape only; tensors, not arrays, so that
        Keras does not cast float64 data to float32."""
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

    def fit(
        self,
        x=None,
        epochs: int = 1,
        batch_size: int | None = None,
        validation_split: float = 0.0,
        validation_data=None,
        patience: int | None = None,
        callbacks: Sequence[tf_keras.callbacks.Callback] | None = None,
        context=None,
        **kwargs,
    ):
        """Maximise the likelihood of `x` (an array, or a `tf.data.Dataset`).

        Arrays (and `context` rows for a conditional model) are checked (shape,
        finiteness), shuffled each epoch and cut into equal batches of `batch_size`
        (default 32); `validation_split` holds out the last fraction of the rows, as
        Keras does; `validation_data` is an array (or `(x_val, c_val)`) or a dataset.
        A conditional model also takes a dataset of `(x, c)` pairs.
        `patience=k` adds `EarlyStopping` on `val_loss` (`loss` without validation
        data) that restores the best weights. Data-dependent initialisations (Glow's
        ActNorm) run on the first training batch. Other keyword arguments go to
        `tf_keras.Model.fit`.
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
            _refuse_keras3(callback, "callbacks", "callbacks")
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
        if isinstance(validation_data, tf.data.Dataset):
            validation_data = self._dataset_checked(validation_data, "validation_data")
        elif validation_data is not None:
            if self._context_shape is None:
                if isinstance(validation_data, tuple) and len(validation_data) == 1:
                    validation_data = validation_data[0]
                if isinstance(validation_data, tuple):
                    raise ValueError(
                        "`validation_data`: an unconditional FlowModel takes an array, not pairs.")
                held = self._arrays(validation_data, None, "validation_data", "validation context")
            else:
                if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                    raise ValueError(
                        "`validation_data`: a conditional FlowModel takes (x_val, c_val).")
                held = self._arrays(validation_data[0], validation_data[1], "validation_data[0]",
                                    "validation_data[1]")
            validation_data = self._batched(held, min(len(held[0]), 8192), shuffle=False)

        if not self._is_compiled:
            self.compile()
        self._check_trainable()
        self._initialize_from(train)
        self._build_optimizer()
        if self._auto_steps:
            self._steps_per_execution.assign(max(1, min(steps or 1, 1000)))

        early_stopping = None
        if patience is not None:
            monitor = "loss" if validation_data is None else "val_loss"
            early_stopping = tf_keras.callbacks.EarlyStopping(
                monitor=monitor, patience=patience, mode="min", restore_best_weights=True)
            callbacks.append(early_stopping)
        callbacks.append(_NonFiniteAndDivergence(early_stopping))
        return super().fit(train, epochs=epochs, validation_data=validation_data,
                           callbacks=callbacks, shuffle=False, **kwargs)

    def _initialize_from(self, train: tf.data.Dataset) -> None:
        """Run the flows' data-dependent initialisations on the first training batch."""
        if not routing.needs_initialization(self.bijector):
            return
        x, context = self._unpack(next(iter(train)))
        routing.initialize(self.bijector, x, context)

    def _build_optimizer(self) -> None:
        """Create the optimizer's slots now, so a skipped step creates nothing in a branch;
        in the model's strategy scope, so that they are mirrored like the variables."""
        variables = self.trainable_variables
        with self.distribute_strategy.scope():
            if isinstance(self.optimizer, tf_keras.optimizers.legacy.Optimizer):
                self.optimizer._create_all_weights(variables)
            else:
                self.optimizer.build(variables)

    # --- configuration and saving ----------------------------------------------------

    def get_config(self) -> dict:
        """The flow's structure (builders and their arguments, TFP bijectors), shapes and name.

        Raises `NotRebuildableError` for a flow that cannot be described (a user's own
        bijector class); `save_weights` and `export` work for every flow.
        """
        try:
            flow = bijector_config(self.bijector)
            base = None if self._default_base else distribution_config(self.base_distribution)
        except NotRebuildableError as error:
            raise NotRebuildableError(
                f"FlowModel cannot save its configuration: {error}. Routes that work for any "
                f"flow: {_ROUTES_FOR_ANY_FLOW}."
            ) from None
        return {
            "bijector": flow,
            "event_shape": list(self._event_shape),
            "base_distribution": base,
            "context_shape": None if self._context_shape is None else list(self._context_shape),
            "dtype": self.flow_dtype.name,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        base = config.get("base_distribution")
        return cls(
            bijector_from_config(config["bijector"]),
            config["event_shape"],
            base_distribution=None if base is None else distribution_from_config(base),
            context_shape=config.get("context_shape"),
            name=config.get("name", "flow_model"),
        )

    def save(self, filepath, *args, **kwargs):
        """`tf_keras.Model.save` (SavedModel folder or `.keras`), after checking the flow
        can be rebuilt from its configuration (else `NotRebuildableError`, naming the
        routes that work)."""
        self.get_config()
        return super().save(filepath, *args, **kwargs)
