"""`FlowModel`: maximum-likelihood training of a flow with tf_keras `fit`, and every Keras route."""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras
from tf_keras.src.engine.training import reduce_per_replica

from tfp_flows import routing
from tfp_flows.checks import check_positive_integer, check_positive_number
from tfp_flows.serialization import (
    NotRebuildableError,
    bijector_config,
    bijector_from_config,
    distribution_config,
    distribution_from_config,
)
from tfp_flows.training import (
    DivergenceWarning,
    EpochGuard,
    FlowTraining,
    all_finite,
    check_base_distribution,
    checked_shapes,
    divergence_threshold,  # noqa: F401 (re-exported: tfp_flows.model.divergence_threshold)
    light_grappler,
    standard_normal,
    steps_per_execution_for,
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


class _NonFiniteAndDivergence(EpochGuard, tf_keras.callbacks.Callback):
    """`EpochGuard` as a tf_keras callback."""


@tf_keras.utils.register_keras_serializable(package="tfp_flows")
class _RunningMean(tf_keras.metrics.Mean):
    """A running mean whose sums stay out of saved files: they restart every epoch, and
    tf_keras cannot restore a metric's (sync-on-read) sums inside a strategy's scope."""

    def save_own_variables(self, store):
        pass

    def load_own_variables(self, store):
        pass


@tf_keras.utils.register_keras_serializable(package="tfp_flows")
class FlowModel(FlowTraining, tf_keras.Model):
    """A trainable `tfd.TransformedDistribution(base, bijector)` for `tf_keras`.

    The loss is built in: the negative log-likelihood `−mean log p(x)` (or
    `−mean log p(x | c)` with `context_shape=[k]`). `fit(x)` (or `fit(x, context=c)`)
    takes data only and logs `loss` and `nll` (nats per example, equal) and
    `bits_per_dim` (`nll / (D · log 2)`), with `val_` twins, so every callback works
    with its default monitor. The bijector maps base samples to data and owns its
    variables (the builders of `tfp_flows.flows`, TFP's bijectors, chains of them);
    they are the model's weights, so every Keras save route keeps them.
    """

    _early_stopping_class = tf_keras.callbacks.EarlyStopping
    _guard_class = _NonFiniteAndDivergence
    _casts_datasets = False

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
        self._event_shape, self._context_shape = checked_shapes(
            list(tf.TensorShape(event_shape).as_list())
            if isinstance(event_shape, tf.TensorShape) else event_shape, context_shape)
        self._default_base = base_distribution is None
        if base_distribution is None:
            floating = [v.dtype for v in bijector.variables if v.dtype.is_floating]
            dtype = bijector.dtype or (floating[0] if floating else tf.float32)
            base_distribution = standard_normal(self._event_shape, dtype)
        check_base_distribution(base_distribution, self._event_shape)
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
    def distribution(self) -> tfd.TransformedDistribution:
        """The flow's `tfd.TransformedDistribution` (base → data through the bijector).

        For a conditional model pass `bijector_kwargs=model.bijector_kwargs(context)`.
        """
        return self._distribution

    def bijector_kwargs(self, context) -> dict:
        """The keyword arguments that route `context` to every conditional part of the bijector."""
        return routing.bijector_kwargs(self.bijector, context)

    def _zeros_context(self, rows: int):
        if self._context_shape is None:
            return None
        return tf.zeros((rows, *self._context_shape), self.flow_dtype)

    def _bijector_call(self, method, x, context):
        return method(x, **routing.bijector_kwargs(self.bijector, context))

    def _log_prob(self, x, context):
        return self._distribution.log_prob(
            x, bijector_kwargs=routing.bijector_kwargs(self.bijector, context))

    def _forward(self, z, context=None):
        return self._bijector_call(self.bijector.forward, z, context)

    def _inverse(self, x, context=None):
        return self._bijector_call(self.bijector.inverse, x, context)

    def _export_variables(self) -> list:
        return list(self._distribution.variables)

    # --- training ------------------------------------------------------------------------

    @property
    def metrics(self):
        return list(self._tracked_metrics)

    def reset_metrics(self) -> None:
        """Zero the running means in one compiled call (Keras makes an eager assign
        per sum: six calls at every epoch's start)."""
        compiled = self._metrics_function(
            "reset", lambda: [m.reset_state() for m in self._tracked_metrics])
        if compiled is None:
            return super().reset_metrics()
        compiled()

    def get_metrics_result(self) -> dict:
        """`{name: running mean}` of the three logs in one compiled call (Keras reads
        them one `tf.function` call each at every epoch's end)."""
        compiled = self._metrics_function(
            "result", lambda: {m.name: m.result() for m in self._tracked_metrics})
        return super().get_metrics_result() if compiled is None else compiled()

    def _metrics_function(self, key: str, body):
        """`body` as a `tf.function`, made once, or None under a distribution strategy
        (where Keras' own eager calls handle the replicas' sums). Held in a plain dict
        outside Keras' attribute tracking, so that no save route records it."""
        if self._under_strategy():
            return None
        functions = self.__dict__.setdefault("_compiled_metric_functions", {})
        if key not in functions:
            functions[key] = tf.function(body, autograph=False)
        return functions[key]

    def _gradients(self, data) -> tuple:
        """`(nll, finite, pairs)`: the batch's mean NLL, its (gradient, variable) pairs
        summed over replicas, and whether the loss and every gradient entry are finite."""
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
        return nll, all_finite([total] + summed), list(zip(summed, [v for _, v in pairs]))

    def train_step(self, data):
        nll, finite, pairs = self._gradients(data)
        tf.__internal__.distribute.interim.maybe_merge_call(
            self._apply_if_finite, self.distribute_strategy, finite, pairs)
        return self._record(nll)

    def _runs_own_train_step(self) -> bool:
        return type(self).train_step is FlowModel.train_step

    def _apply(self, pairs):
        """The optimizer's update from (gradient, variable) pairs already summed over replicas."""
        self.optimizer.apply_gradients(pairs, experimental_aggregate_gradients=False)
        return tf.constant(True)

    def _counted(self, outputs):
        """`outputs`, once Keras' step counter has counted the step that made them."""
        with tf.control_dependencies(tf.nest.flatten(outputs)):
            self._train_counter.assign_add(1)
        return outputs

    def make_train_function(self, force: bool = False):
        """Keras' train function; with several steps per execution, the step traced once.

        tf_keras builds the step's `tf.function` inside its loop body, and AutoGraph
        traces that body twice (once to learn the loop variables), so the flow's
        graph is built twice. Here the step function is made once and the first step
        runs before the loop: same steps, same counters, one trace.
        """
        if self.train_function is not None and not force:
            return self.train_function
        if (self.run_eagerly or self._cluster_coordinator is not None
                or self._steps_per_execution is None
                or (self._steps_per_execution.numpy().item() == 1
                    and not self.autotune_steps_per_execution)):
            return super().make_train_function(force)
        strategy = self.distribute_strategy
        if self._splits_step():
            split_step = self._split_step()

            def run_step(data):
                return self._counted(split_step(data))
        else:
            def run_step(data):
                return self._counted(self.train_step(data))

            # No AutoGraph: the flows use no Python control flow on tensors, and
            # converting their code took about a sixth of Glow's trace.
            run_step = tf.function(run_step, jit_compile=bool(self.jit_compile),
                                   reduce_retracing=True, autograph=False)

        def one_step(iterator):
            outputs = strategy.run(run_step, args=(next(iterator),))
            return reduce_per_replica(outputs, strategy, reduction=self.distribute_reduction_method)

        def train_function(iterator):
            steps = self._steps_per_execution
            _, outputs = tf.while_loop(
                lambda i, _: i < steps - 1,
                lambda i, _: (i + 1, one_step(iterator)),
                (tf.constant(0, steps.dtype), one_step(iterator)),
            )
            return outputs

        self.train_tf_function = self.train_function = tf.function(
            train_function, reduce_retracing=True, autograph=False)
        if self.jit_compile and not self._under_strategy():
            # The steps are XLA programs: Grappler need not rewrite them (on one device;
            # under a strategy it may still serve the replicas' all-reduce).
            compiled = self.train_function

            def train_function_with_light_grappler(iterator):
                with light_grappler():
                    return compiled(iterator)

            self.train_function = train_function_with_light_grappler
        return self.train_function

    def _apply_if_finite(self, strategy, finite, grads_and_vars) -> None:
        """Apply the step, or skip it whole when `finite` is false (weights, optimizer slots
        and `iterations` stay). Under strategies that synchronise by `merge_call` this runs
        in cross-replica context: a replica cannot synchronise inside a branch of its own."""
        if tf.distribute.in_cross_replica_context():
            finite = strategy.experimental_local_results(finite)[0]

            def apply():
                strategy.extended.call_for_each_replica(self._apply, args=(grads_and_vars,))
                return tf.constant(True)
        else:
            def apply():
                return self._apply(grads_and_vars)

        tf.cond(finite, apply, lambda: tf.constant(False))

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
        `"epoch"` (default) runs a whole epoch's batches in one compiled call when the
        epoch's length is known (arrays, or a dataset with `steps_per_epoch`; past 1000
        steps, equal calls of the smallest divisor of the epoch's steps from 1000 up).
        Keras' progress bar and epoch-level callbacks are unchanged; batch-level
        callbacks then see one call per epoch. Or an integer as in Keras.
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
        return self._fit(x, epochs, batch_size, validation_split, validation_data, patience,
                         callbacks, context, kwargs)

    def _refuse_callback(self, callback) -> None:
        _refuse_keras3(callback, "callbacks", "callbacks")

    def _prepare_fit(self, train: tf.data.Dataset, epoch_steps: int | None) -> None:
        """Compile if needed, check the trainable variables, run the flows' data-dependent
        initialisations on the first training batch, build the optimizer; under
        `steps_per_execution="epoch"` set the steps per call from the epoch's."""
        if not self._is_compiled:
            self.compile()
        self._check_trainable()
        if routing.needs_initialization(self.bijector):
            routing.initialize(self.bijector, *self._first_batch(train))
        self._build_optimizer()
        if self._auto_steps:
            self._steps_per_execution.assign(steps_per_execution_for(epoch_steps))

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
