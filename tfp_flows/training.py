"""Keras-free training logic shared by `tfp_flows.FlowModel` (tf_keras) and
`tfp_flows.keras3.FlowModel`.

`FlowTraining` is a mixin placed before the Keras model class: it checks and
batches the data and contexts, records the NLL's metrics, samples, exports, and
runs `fit`'s argument handling before the Keras `fit` it precedes in the MRO.
`EpochGuard` is mixed into each Keras' `Callback`: the epoch-level checks for
non-finite NLLs and divergence. Nothing here imports a Keras.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import warnings
from typing import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
from tensorflow.python.eager import context as eager_context

from tfp_flows.checks import (
    check_fraction,
    check_integer,
    check_positive_integer,
    check_samples,
    check_shape,
)
from tfp_flows.export import export_functions

tfd = tfp.distributions

__all__ = [
    "DivergenceWarning",
    "EpochGuard",
    "FlowTraining",
    "all_finite",
    "batches_per_pass",
    "check_base_distribution",
    "checked_shapes",
    "divergence_threshold",
    "standard_normal",
    "steps_per_execution_for",
]


@functools.lru_cache(maxsize=8)
def _light_grappler_options(serialized: bytes, executor_type):
    config = config_pb2.ConfigProto.FromString(serialized)
    rewrites = config.graph_options.rewrite_options
    rewrites.function_optimization = rewriter_config_pb2.RewriterConfig.OFF
    rewrites.disable_tfg_optimizer = True
    return eager_context.FunctionCallOptions(executor_type=executor_type, config_proto=config)


@contextlib.contextmanager
def light_grappler():
    """Calls of `tf.function`s made in this block, on this thread, run Grappler without
    its two passes over the function library.

    Grappler, TensorFlow's graph rewriter, runs when a function is first called, over
    its graph and every function it calls. Around XLA-compiled steps its function
    optimiser (inlining, specialisation) and its TFG (MLIR) pipeline walk the steps'
    whole graphs for nothing (XLA compiles them itself): 0.33 of its 0.46 s on a
    Glow's first epoch. Its other optimisers, which tidy the epoch loop, still run.
    The thread's other call options are kept, and restored after.
    """
    context = eager_context.context()
    options = context.function_call_options
    context.function_call_options = copy.copy(_light_grappler_options(
        options.config_proto_serialized, options.executor_type))
    try:
        yield
    finally:
        context.function_call_options = options


class DivergenceWarning(UserWarning):
    """An epoch ended with a training NLL far above the first epoch's."""


def divergence_threshold(first_nll: float) -> float:
    """Training has diverged when an epoch's NLL exceeds `first + max(10, |first| / 2)` nats."""
    return first_nll + max(10.0, 0.5 * abs(first_nll))


class EpochGuard:
    """Epoch-level guard against non-finite NLLs and divergence, mixed into a Keras `Callback`.

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


def all_finite(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
    """Whether every entry of every tensor is finite, as one boolean.

    One `is_finite` per dtype over the tensors flattened and joined, not one per
    tensor: XLA's compile makes a kernel of each `is_finite` node (about 4 ms of
    compile each on these CPUs), where the joined check is one reduction.
    """
    by_dtype = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tf.reshape(tensor, [-1]))
    checks = [tf.reduce_all(tf.math.is_finite(tf.concat(flat, axis=0)))
              for flat in by_dtype.values()]
    return checks[0] if len(checks) == 1 else tf.reduce_all(tf.stack(checks))


def standard_normal(event_shape: Sequence[int], dtype: tf.DType) -> tfd.Distribution:
    """The default base distribution: independent standard normals over `event_shape`."""
    return tfd.Sample(tfd.Normal(tf.zeros([], dtype), tf.ones([], dtype)), list(event_shape))


def checked_shapes(event_shape: Sequence[int],
                   context_shape: Sequence[int] | None) -> tuple[tuple, tuple | None]:
    """`(event_shape, context_shape)` checked; a context shape must be `[k]`."""
    event = check_shape("event_shape", event_shape)
    context = None if context_shape is None else check_shape("context_shape", context_shape)
    if context is not None and len(context) != 1:
        raise ValueError(
            f"`context_shape` must be [k] (a context vector); given {list(context)}."
        )
    return event, context


def check_base_distribution(base_distribution, event_shape: tuple) -> None:
    """Refuse a base that is not a TFP distribution or whose event shape is not `event_shape`."""
    if not isinstance(base_distribution, tfd.Distribution):
        raise TypeError(
            "`base_distribution` must be a tfp.distributions.Distribution; "
            f"given {type(base_distribution).__name__}."
        )
    if base_distribution.event_shape.as_list() != list(event_shape):
        raise ValueError(
            f"`base_distribution` has event shape {base_distribution.event_shape.as_list()}; "
            f"expected the model's event_shape {list(event_shape)}."
        )


def _drops_remainder(rows: int, batch_size: int, shuffle: bool) -> bool:
    """Whether a pass over `rows` drops the remainder: shuffled passes do (equal
    batches, one XLA shape), unless there is not one full batch; unshuffled ones keep
    it as a last, smaller batch."""
    return shuffle and rows >= batch_size


def batches_per_pass(rows: int, batch_size: int, shuffle: bool) -> int:
    """The batches in one pass over `rows` (see `_drops_remainder`)."""
    if _drops_remainder(rows, batch_size, shuffle):
        return rows // batch_size
    return math.ceil(rows / batch_size)


# Under `steps_per_execution="epoch"`, an epoch of up to this many steps runs as one call.
_STEPS_PER_CALL = 1000


def steps_per_execution_for(epoch_steps: int | None) -> int:
    """The steps of one compiled call under `steps_per_execution="epoch"`.

    The whole epoch up to 1000 steps; a longer epoch in equal calls, of its smallest
    divisor from 1000 up (Keras 3 runs whole calls, so one that crossed the epoch's end
    would take the next epoch's batches); 1 when the epoch's length is unknown (a
    dataset without `steps_per_epoch`).
    """
    if epoch_steps is None:
        return 1
    if epoch_steps <= _STEPS_PER_CALL:
        return epoch_steps
    divisors = set()
    for d in range(1, math.isqrt(epoch_steps) + 1):
        if epoch_steps % d == 0:
            divisors.update((d, epoch_steps // d))
    return min(d for d in divisors if d >= _STEPS_PER_CALL)


class FlowTraining:
    """What both `FlowModel`s share; placed before the Keras model class in the bases.

    The model provides `_event_shape`, `_context_shape`, `_event_size`,
    `base_distribution`, `metrics` (the `loss`, `nll` and `bits_per_dim` means), and:
    `_log_prob(x, context)`, `_forward(z, context=None)`, `_inverse(x, context=None)`,
    `_export_variables()`, `_refuse_callback(callback)`, `_gradients(data)` (a replica's
    `(nll, finite, (gradient, variable) pairs)`), `_apply(pairs)` (the optimizer's update),
    `_runs_own_train_step()`, `_prepare_fit(train, epoch_steps)`
    (compile, check, initialise, build the optimizer; `epoch_steps` the steps of an
    epoch, None when unknown), `_early_stopping_class` (its
    Keras' `EarlyStopping`), `_guard_class` (an `EpochGuard` callback) and
    `_casts_datasets` (whether a dataset of another float dtype is cast to the flow's,
    rather than refused).
    """

    # --- the context and the distribution -----------------------------------------------

    @property
    def flow_dtype(self) -> tf.DType:
        """The flow's floating dtype (the base distribution's)."""
        return self.base_distribution.dtype

    @property
    def event_shape(self) -> tuple:
        return self._event_shape

    @property
    def context_shape(self) -> tuple | None:
        return self._context_shape

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
            return self._forward(self.base_distribution.sample(n, seed=seed), None)
        single = context is not None and np.ndim(context) == 1
        context = self._checked_context(np.reshape(context, (1, -1)) if single else context, None)
        m = int(context.shape[0])
        z = self.base_distribution.sample(n * m, seed=seed)
        x = tf.reshape(self._forward(z, tf.tile(context, [n, 1])), [n, m, *self._event_shape])
        return x[:, 0] if single else x

    def export(self, path: str) -> str:
        """Write a SavedModel with `log_prob`, `sample`, `forward`, `inverse` for plain TensorFlow.

        Conditional models' functions take the context too (see `export_functions`).
        """
        def sample(n, context=None):
            if context is None:
                return self._forward(self.base_distribution.sample(n), None)
            m = tf.shape(context)[0]
            x = self._forward(self.base_distribution.sample(n * m), tf.tile(context, [n, 1]))
            return tf.reshape(x, tf.concat([[n, m], list(self._event_shape)], axis=0))

        return export_functions(
            path, self._export_variables(), self._event_shape, self.flow_dtype,
            self._log_prob if self._context_shape else (lambda x: self._log_prob(x, None)),
            sample, self._forward, self._inverse, self._context_shape,
        )

    # --- steps ----------------------------------------------------------------------------

    def _record(self, nll):
        loss, mean_nll, bits_per_dim = self.metrics
        loss.update_state(nll)
        mean_nll.update_state(nll)
        bits_per_dim.update_state(nll / (self._event_size * math.log(2.0)))
        return {m.name: m.result() for m in self.metrics}

    # From this many trainable parameters on, `fit` runs `_split_step`. Below it the
    # second program's launch is not paid back (a prototype, whole `fit` calls: planar
    # 32, 160 parameters, 4.4 against 3.9 ms per step; MAF 5 x [64, 64], 28 880, 7.95
    # against 7.76 ms).
    _SPLIT_STEP_MIN_PARAMETERS = 100_000

    def _under_strategy(self) -> bool:
        """Whether the model trains under a distribution strategy: the one in scope, or its
        own (that of the scope it was made in; otherwise TensorFlow's default strategy)."""
        return (tf.distribute.has_strategy()
                or self.distribute_strategy is not tf.distribute.get_strategy())

    def _splits_step(self) -> bool:
        """Whether `fit`'s steps run as `_split_step`: compiled with XLA, outside a
        distribution strategy, with the model's own `train_step`, for a large enough model."""
        size = sum(math.prod(v.shape) for v in self.trainable_variables)
        return (bool(self.jit_compile) and not self.run_eagerly and not self._under_strategy()
                and self._runs_own_train_step() and size >= self._SPLIT_STEP_MIN_PARAMETERS)

    def _split_step(self):
        """The training step as two XLA programs, gradients then the optimizer's update,
        with the skip of a non-finite step between them in TensorFlow.

        Same steps as `train_step` under XLA; for large models faster, as XLA:CPU runs
        an optimizer update inside a conditional slower than at the top level, and it
        compiles the two programs faster than the one with the conditional. Measured in
        one process, epochs interleaved, per step (tf_keras): MAF 5 x [256, 256]
        (361 040 parameters) 16.4 against 20.8 ms, first epoch 3.4 against 3.8 s; Glow
        16x16x3, 2 x 4, h64 (161 520) 23.1 against 22.9 ms, first epoch 15.6 against 16.8 s.
        """
        variables = []  # those with a gradient, found when `gradients` is traced

        def gradients(data):
            nll, finite, pairs = self._gradients(data)
            variables[:] = [v for _, v in pairs]
            return self._record(nll), finite, [g for g, _ in pairs]

        def apply(grads):
            return self._apply(list(zip(grads, variables)))

        gradients = tf.function(gradients, jit_compile=True, autograph=False)
        apply = tf.function(apply, jit_compile=True, autograph=False)

        def run_step(data):
            outputs, finite, grads = gradients(data)
            tf.cond(finite, lambda: apply(grads), lambda: tf.constant(False))
            return outputs

        return run_step

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

    def _first_batch(self, train: tf.data.Dataset) -> tuple:
        """`(x, context)` of the first training batch, for data-dependent initialisations."""
        return self._unpack(next(iter(train)))

    def test_step(self, data):
        x, context = self._unpack(data)
        return self._record(-tf.reduce_mean(self._log_prob(x, context)))

    # --- data -----------------------------------------------------------------------------

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
        if not self._casts_datasets and any(d != self.flow_dtype for d in dtypes):
            raise TypeError(
                f"`{name}`: a dataset must yield {self.flow_dtype.name} tensors (the flow's "
                f"dtype); given {', '.join(d.name for d in dtypes)}."
            )
        message = f"`{name}`: the dataset holds NaN or inf values."
        dtype = self.flow_dtype

        def checked(*tensors):
            out = tuple(tf.debugging.assert_all_finite(tf.cast(t, dtype), message) for t in tensors)
            return out if len(out) > 1 else out[0]

        return data.map(checked)

    def _batched(self, arrays: tuple, batch_size: int, shuffle: bool,
                 repeat: bool = False) -> tf.data.Dataset:
        """Batches of equal size (the remainder is dropped when shuffling), so that
        XLA compiles the step for one shape only; tensors, not arrays, so that
        Keras does not cast float64 data to float32. Each epoch draws one
        permutation of the row indices and each batch is one `tf.gather` of its
        slice of it: per batch, not per row, work (tf.data's row-by-row
        `shuffle().batch()` cost about 1 ms per batch of 512, as much as a
        planar step). `repeat`: the epochs one after another in one endless
        dataset (reshuffled each time), so that `fit` keeps one iterator instead
        of building one at every epoch."""
        tensors = tuple(tf.constant(a, self.flow_dtype) for a in arrays)
        rows = len(arrays[0])
        steps = batches_per_pass(rows, batch_size, shuffle)
        equal = _drops_remainder(rows, batch_size, shuffle)
        end = min(rows, steps * batch_size)

        def epoch(_):
            order = tf.random.shuffle(tf.range(rows)) if shuffle else tf.range(rows)

            def batch(start):
                rows_of_batch = order[start:start + batch_size]
                taken = tuple(tf.gather(t, rows_of_batch) for t in tensors)
                if equal:
                    for t in taken:
                        t.set_shape([batch_size, *t.shape[1:]])
                return taken if len(taken) > 1 else taken[0]

            return tf.data.Dataset.range(0, end, batch_size).map(batch)

        epochs = tf.data.Dataset.range(1)
        data = (epochs.repeat() if repeat else epochs).flat_map(epoch)
        # `flat_map` hides the length, which Keras needs (several steps per execution).
        batches = tf.data.INFINITE_CARDINALITY if repeat else steps
        return data.apply(tf.data.experimental.assert_cardinality(batches)).prefetch(
            tf.data.AUTOTUNE)

    def _arrays(self, x, context, name: str, context_name: str) -> tuple:
        array = check_samples(x, self._event_shape, name)
        if self._context_shape is None:
            self._checked_context(context, None, context_name)
            return (array,)
        self._checked_context(context, len(array), context_name)
        return array, check_samples(context, self._context_shape, context_name)

    def _validation(self, validation_data) -> tf.data.Dataset:
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

    # --- fit ------------------------------------------------------------------------------

    def _fit(self, x, epochs, batch_size, validation_split, validation_data, patience,
             callbacks, context, kwargs: dict):
        """`fit`'s work for both models (see their docstrings), then the Keras `fit`."""
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
            self._refuse_callback(callback)
        shuffle = kwargs.pop("shuffle", True)
        if not isinstance(shuffle, bool):
            raise TypeError(f"`shuffle` must be True or False; given {shuffle!r}.")

        epoch_steps = kwargs.get("steps_per_epoch")
        if epoch_steps is not None:
            epoch_steps = kwargs["steps_per_epoch"] = check_positive_integer(
                "steps_per_epoch", epoch_steps)
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
            # One endless stream of reshuffled passes over the rows, so that Keras keeps
            # one iterator for the call; an epoch is one pass, or the caller's
            # `steps_per_epoch` batches of the stream (as tf_keras does with arrays).
            if epoch_steps is None:
                epoch_steps = kwargs["steps_per_epoch"] = batches_per_pass(
                    len(arrays[0]), batch_size, shuffle)
            train = self._batched(arrays, batch_size, shuffle, repeat=True)
        if validation_data is not None:
            validation_data = self._validation(validation_data)

        self._prepare_fit(train, epoch_steps)
        early_stopping = None
        if patience is not None:
            monitor = "loss" if validation_data is None else "val_loss"
            early_stopping = self._early_stopping_class(
                monitor=monitor, patience=patience, mode="min", restore_best_weights=True)
            callbacks.append(early_stopping)
        callbacks.append(self._guard_class(early_stopping))
        return super().fit(train, epochs=epochs, validation_data=validation_data,
                           callbacks=callbacks, shuffle=False, **kwargs)
