"""Training with optax: small pure-functional pieces, not a framework.

The pieces compose into the usual loop and nothing more:

- models: a linear softmax classifier :math:`f(x; W, b) = xW + b`
  (`init_linear`, `linear_logits`) and binary logistic regression, one
  output passed through a sigmoid (`init_logistic`, `logistic_logits`);
- losses: `make_loss(name)` returns a per-example loss `(logits, labels) ->
  [n]` from the library ("ce", "smooth", "focal", "hinge", "mse" for
  classes, "bce" for the binary model), so one loop compares them;
- `l2_penalty`, `make_train_step` (a jitted optax update for any
  `optax.GradientTransformation`), `fit` (minibatch epochs as one jitted
  `lax.scan`, optional progress bar) and `evaluate_classifier` (accuracy and
  top-k accuracy).

Example:
  >>> import jax, optax
  >>> from xentjax import datasets, train
  >>> data = datasets.load_digits()
  >>> params = train.init_linear(jax.random.key(0), 64, 10)
  >>> params, history = train.fit(params, optax.adam(0.05), data, epochs=3,
  ...                             batch_size=64, seed=0)
  >>> history["test_accuracy"][-1] > 0.8
  True
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from xentjax import _core, metrics
from xentjax._api import public
from xentjax.losses._focal import softmax_focal_loss
from xentjax.losses._margin import multiclass_hinge_loss
from xentjax.losses._regression import squared_error
from xentjax.losses._sigmoid import sigmoid_binary_cross_entropy
from xentjax.losses._softmax import softmax_cross_entropy_with_integer_labels

__all__ = [
  "LOSSES",
  "OPTIMIZERS",
  "LossFn",
  "ModelFn",
  "Params",
  "epochs_to_accuracy",
  "evaluate_classifier",
  "fit",
  "init_linear",
  "init_logistic",
  "l2_penalty",
  "linear_logits",
  "logistic_logits",
  "logit_gradient_gap",
  "make_loss",
  "make_optimizer",
  "make_train_step",
]

#: The parameters of the models here: a dict of arrays, ``{"w": ..., "b": ...}``
#: (`init_linear`, `init_logistic`).
Params = dict[str, jax.Array]
#: A per-example loss, ``loss_fn(logits, labels) -> [n]``: what `make_loss`
#: returns and what `fit`, `make_train_step` and `epochs_to_accuracy` take
#: (any function of that shape works, e.g. a public xentjax loss).
LossFn = Callable[[jax.Array, jax.Array], jax.Array]
#: A model, ``model(params, x) -> logits``: `linear_logits` (the default) and
#: `logistic_logits`, or any function of that shape (a Flax ``apply``, say).
ModelFn = Callable[[Any, jax.Array], jax.Array]

#: The names `make_loss` knows.
LOSSES = ("ce", "smooth", "focal", "hinge", "mse", "mse_logits", "bce")
#: The names `make_optimizer` knows.
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "rmsprop", "adagrad")


# ---------------------------------------------------------------------------
# Models.
# ---------------------------------------------------------------------------


def init_linear(
  key: jax.Array, num_features: int, num_classes: int, *, scale: float = 0.01
) -> Params:
  """Initial parameters of a linear softmax classifier.

  Args:
    key: a `jax.random` key.
    num_features: input dimension :math:`d`.
    num_classes: number of classes :math:`K`.
    scale: standard deviation of the normal initial weights.

  Returns:
    ``{"w": [d, K], "b": [K]}``, float32 (float64 under x64); `b` is zero.
  """
  w = scale * jax.random.normal(key, (num_features, num_classes), dtype=float)
  return {"w": w, "b": jnp.zeros((num_classes,), dtype=w.dtype)}


@public()
def linear_logits(params: Params, x: jax.typing.ArrayLike) -> jax.Array:
  """Logits of the linear classifier, :math:`z = xW + b`.

  Args:
    params: `{"w": [d, K], "b": [K]}` as from `init_linear`.
    x: inputs, `[..., d]`.

  Returns:
    Logits `[..., K]`.
  """
  x = jnp.asarray(x)
  b = params["b"]
  return x @ params["w"] + jnp.reshape(b, (1,) * (x.ndim - 1) + b.shape)


def init_logistic(key: jax.Array, num_features: int, *, scale: float = 0.01) -> Params:
  """Initial parameters of binary logistic regression.

  Args:
    key: a `jax.random` key.
    num_features: input dimension :math:`d`.
    scale: standard deviation of the normal initial weights.

  Returns:
    ``{"w": [d], "b": []}``; `b` is zero.
  """
  w = scale * jax.random.normal(key, (num_features,), dtype=float)
  return {"w": w, "b": jnp.zeros((), dtype=w.dtype)}


@public()
def logistic_logits(params: Params, x: jax.typing.ArrayLike) -> jax.Array:
  """One logit per example, :math:`z = x \\cdot w + b`, with :math:`P(y=1) = \\sigma(z)`.

  Args:
    params: `{"w": [d], "b": []}` as from `init_logistic`.
    x: inputs, `[..., d]`.

  Returns:
    Logits `[...]`.
  """
  return jnp.asarray(x) @ params["w"] + params["b"]


# ---------------------------------------------------------------------------
# Losses and the penalty.
# ---------------------------------------------------------------------------


@functools.cache
def make_loss(name: str, *, label_smoothing: float = 0.1, gamma: float = 2.0) -> LossFn:
  """A per-example loss `(logits, labels) -> [n]` by name.

  Classes, with integer labels `[n]` and logits `[n, K]`:

  - "ce": softmax cross-entropy, :math:`\\log\\sum_j e^{z_j} - z_y`;
  - "smooth": the same with labels smoothed by `label_smoothing`;
  - "focal": `xentjax.softmax_focal_loss` with `gamma` on the one-hot labels
    (NaN for a label outside ``[0, K)``, as for "ce");
  - "hinge": multiclass hinge, :math:`\\max_j (z_j + [j \\ne y]) - z_y`;
  - "mse": :math:`\\sum_j (\\mathrm{softmax}(z)_j - [j = y])^2`, squared
    error of the predicted probabilities against the one-hot label (the
    Brier score): the loss of the classic "why not squared error" argument,
    whose gradient saturates through the softmax;
  - "mse_logits": :math:`\\sum_j (z_j - [j = y])^2`, squared error of the
    raw scores against the one-hot label (least-squares classification).

  Binary, with labels in {0, 1} `[n]` and one logit per example `[n]`:

  - "bce": sigmoid binary cross-entropy.

  Args:
    name: one of `LOSSES`.
    label_smoothing: :math:`\\varepsilon` for "smooth".
    gamma: :math:`\\gamma` for "focal".

  Returns:
    A function `(logits, labels) -> losses [n]`. The same arguments return
    the same function object, so `fit` reuses its compiled epoch.
  """
  if name == "ce":
    return softmax_cross_entropy_with_integer_labels
  if name == "smooth":
    return lambda z, y: softmax_cross_entropy_with_integer_labels(
      z, y, label_smoothing=label_smoothing
    )
  if name == "focal":
    return functools.partial(_focal_on_integer_labels, gamma=gamma)
  if name == "hinge":
    return multiclass_hinge_loss
  if name in ("mse", "mse_logits"):
    on_probs = name == "mse"

    def mse(z, y):
      onehot = jax.nn.one_hot(y, z.shape[-1], dtype=z.dtype)
      pred = jax.nn.softmax(z, axis=-1) if on_probs else z
      return jnp.sum(squared_error(pred, onehot), axis=-1)

    return mse
  if name == "bce":
    return lambda z, y: sigmoid_binary_cross_entropy(z, jnp.asarray(y, z.dtype))
  raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(LOSSES)}.")


def _focal_on_integer_labels(z, y, *, gamma: float):
  """`xentjax.softmax_focal_loss` of the one-hot labels; NaN for a label outside ``[0, K)``."""
  status = _core.label_status(y, z.shape[-1])
  onehot = jax.nn.one_hot(status.index, z.shape[-1], dtype=z.dtype)
  return jnp.where(status.bad, jnp.nan, softmax_focal_loss(z, onehot, gamma=gamma))


def _key_tuple(exclude) -> tuple:
  """`exclude` as a hashable tuple of keys (a single string is one key)."""
  return (exclude,) if isinstance(exclude, str) else tuple(exclude)


@public(("exclude",), validators={"exclude": _key_tuple})
def l2_penalty(params: Any, *, exclude: Sequence[str] = ("b",)) -> jax.Array:
  """Half the squared L2 norm of the weights, :math:`\\tfrac12 \\sum w^2`.

  Biases are not penalised: leaves whose dictionary key is in `exclude` are
  skipped.

  Args:
    params: a pytree of arrays (e.g. `{"w": ..., "b": ...}`).
    exclude: dictionary keys of the leaves left out.

  Returns:
    A scalar.
  """
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  total = jnp.zeros(())
  for path, leaf in leaves:
    last = path[-1] if path else None
    if isinstance(last, jax.tree_util.DictKey) and last.key in exclude:
      continue
    total = total + 0.5 * jnp.sum(jnp.square(leaf))
  return total


@functools.lru_cache(maxsize=64)
def make_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
  """An optax optimizer by name: one of `OPTIMIZERS`.

  "momentum" is SGD with momentum 0.9 (not Nesterov); "adamw" uses weight
  decay 1e-4; the others use optax's defaults. Optax transformations are
  stateless, so the same arguments return the same (shared) object and `fit`
  reuses its compiled epoch.
  """
  if name == "sgd":
    return optax.sgd(learning_rate)
  if name == "momentum":
    return optax.sgd(learning_rate, momentum=0.9)
  if name == "adam":
    return optax.adam(learning_rate)
  if name == "adamw":
    return optax.adamw(learning_rate, weight_decay=1e-4)
  if name == "rmsprop":
    return optax.rmsprop(learning_rate)
  if name == "adagrad":
    return optax.adagrad(learning_rate)
  raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}.")


# ---------------------------------------------------------------------------
# Update step and training loop.
# ---------------------------------------------------------------------------


def _objective(loss_fn: LossFn, model: ModelFn, l2: float):
  """`(params, x, y, weights) -> weighted mean loss + l2 * penalty`."""

  def objective(params, x, y, weights):
    losses = loss_fn(model(params, x), y)
    data = jnp.sum(weights * losses) / jnp.maximum(jnp.sum(weights), 1.0)
    return data + l2 * l2_penalty(params) if l2 else data

  return objective


def _update(loss_fn, optimizer, l2, model):
  objective = _objective(loss_fn, model, l2)

  def update(params, opt_state, x, y, weights):
    loss, grads = jax.value_and_grad(objective)(params, x, y, weights)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return update


def make_train_step(
  loss_fn: LossFn,
  optimizer: optax.GradientTransformation,
  *,
  l2: float = 0.0,
  model: ModelFn = linear_logits,
) -> Callable:
  """A jitted optax update on one minibatch.

  The objective is :math:`\\frac1n \\sum_i \\ell(f(x_i), y_i) + \\lambda
  \\cdot \\mathrm{l2\\_penalty}(\\theta)` with :math:`\\lambda` = `l2`.

  Args:
    loss_fn: a per-example loss `(logits, labels) -> [n]` (see `make_loss`).
    optimizer: any `optax.GradientTransformation`.
    l2: weight of `l2_penalty`.
    model: `(params, x) -> logits`.

  Returns:
    `step(params, opt_state, x, y) -> (params, opt_state, loss)`, where
    `loss` is the objective before the update.
  """
  update = _update(loss_fn, optimizer, l2, model)

  @jax.jit
  def step(params, opt_state, x, y):
    weights = jnp.ones(jnp.shape(y), dtype=jnp.result_type(float))
    return update(params, opt_state, x, y, weights)

  return step


@functools.partial(jax.jit, static_argnums=0)
def _model_accuracy(model, params, x, y):
  return _accuracy_from_logits(model(params, x), y)


def _accuracy_from_logits(logits: jax.Array, y: jax.Array) -> jax.Array:
  if logits.ndim == y.ndim:  # binary: one logit per example, class 1 when z > 0
    return jnp.mean(((logits > 0).astype(y.dtype) == y).astype(jnp.float32))
  return metrics.accuracy(logits, y)


@functools.lru_cache(maxsize=32)
def _make_epoch(loss_fn, optimizer, l2, model, num_examples, batch_size):
  """A jitted epoch: shuffle, pad to whole batches, `lax.scan` the updates.

  The last batch is padded with weight-0 copies of example 0, so every
  example is seen once per epoch and the padding changes nothing. Cached, so
  repeated `fit` calls with the same loss, optimizer object and sizes reuse
  one compiled epoch.
  """
  update = _update(loss_fn, optimizer, l2, model)
  num_batches = math.ceil(num_examples / batch_size)
  pad = num_batches * batch_size - num_examples

  @jax.jit
  def epoch(params, opt_state, key, x, y):
    order = jax.random.permutation(key, num_examples)
    order = jnp.concatenate([order, jnp.zeros((pad,), order.dtype)])
    weights = jnp.concatenate(
      [
        jnp.ones((num_examples,), jnp.result_type(float)),
        jnp.zeros((pad,), jnp.result_type(float)),
      ]
    )
    idx = order.reshape(num_batches, batch_size)
    weights = weights.reshape(num_batches, batch_size)

    def body(carry, batch):
      params, opt_state = carry
      bidx, bw = batch
      params, opt_state, loss = update(params, opt_state, x[bidx], y[bidx], bw)
      return (params, opt_state), loss * jnp.sum(bw)

    (params, opt_state), losses = lax.scan(body, (params, opt_state), (idx, weights))
    return params, opt_state, jnp.sum(losses) / num_examples

  return epoch


def _progress_bar(total: int, progress: bool | None, desc: str):
  """A tqdm bar when asked for (or stderr is a terminal), else None."""
  if progress is None:
    progress = sys.stderr.isatty()
  if not progress:
    return None
  try:
    from tqdm.auto import tqdm
  except ImportError:  # tqdm is optional: train silently
    return None
  return tqdm(total=total, desc=desc, unit="epoch", file=sys.stderr, leave=False)


def _report(bar, callback, epoch: int, params, record: Mapping[str, float]) -> None:
  """Show an epoch's record on the bar and hand it to the callback."""
  if bar is not None:
    bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['train_accuracy']:.3f}")
    bar.update(1)
  if callback is None:
    return
  if bar is None:
    callback(epoch, params, record)
  else:  # let the callback print without tearing the bar
    with type(bar).external_write_mode():
      callback(epoch, params, record)


def fit(
  params: Any,
  optimizer: optax.GradientTransformation,
  data: Sequence[np.ndarray],
  *,
  epochs: int,
  batch_size: int,
  seed: int,
  loss: str | LossFn = "ce",
  l2: float = 0.0,
  model: ModelFn = linear_logits,
  progress: bool | None = None,
  callback: Callable[[int, Any, Mapping[str, float]], None] | None = None,
) -> tuple[Any, dict[str, list[float]]]:
  """Train by minibatch descent and record the history of each epoch.

  Each epoch shuffles the training set with a key derived from `seed` and
  the epoch number, then runs one jitted `lax.scan` over its minibatches.
  The same arguments always give the same parameters and history.

  Args:
    params: initial parameters for `model`.
    optimizer: any `optax.GradientTransformation`.
    data: `(x_train, y_train)` or `(x_train, y_train, x_test, y_test)`; `x`
      `[n, d]`, `y` `[n]` integer classes (or {0, 1} for a binary model).
    epochs: number of passes over the training set.
    batch_size: examples per update (the last batch of an epoch is padded
      with zero-weight examples).
    seed: seed of the shuffling.
    loss: a name for `make_loss`, or a per-example loss function.
    l2: weight of `l2_penalty` in the objective.
    model: `(params, x) -> logits`.
    progress: draw a tqdm progress bar on stderr; `None` draws one only when
      stderr is a terminal (and tqdm is installed).
    callback: called after every epoch as `callback(epoch, params, record)`
      with `epoch` counted from 1 and `record` that epoch's history entries.

  Returns:
    `(params, history)`; `history` maps "loss" (mean objective over the
    epoch's minibatches), "train_accuracy" and, when test data are given,
    "test_accuracy" to lists with one float per epoch.
  """
  if epochs < 0 or batch_size < 1:
    raise ValueError(f"need epochs >= 0 and batch_size >= 1, got {epochs}, {batch_size}.")
  x_train, y_train = jnp.asarray(data[0]), jnp.asarray(data[1])
  test = (jnp.asarray(data[2]), jnp.asarray(data[3])) if len(data) >= 4 else None
  loss_fn = make_loss(loss) if isinstance(loss, str) else loss
  n = x_train.shape[0]
  try:
    epoch_fn = _make_epoch(loss_fn, optimizer, float(l2), model, n, min(batch_size, n))
  except TypeError:  # an unhashable optimizer or loss: compile without the cache
    epoch_fn = _make_epoch.__wrapped__(loss_fn, optimizer, float(l2), model, n, min(batch_size, n))
  accuracy = functools.partial(_model_accuracy, model)

  opt_state = optimizer.init(params)
  key = jax.random.key(seed)
  history: dict[str, list[float]] = {"loss": [], "train_accuracy": []}
  if test is not None:
    history["test_accuracy"] = []
  bar = _progress_bar(epochs, progress, desc="training")
  try:
    for epoch in range(1, epochs + 1):
      params, opt_state, epoch_loss = epoch_fn(
        params, opt_state, jax.random.fold_in(key, epoch), x_train, y_train
      )
      record = {
        "loss": float(epoch_loss),
        "train_accuracy": float(accuracy(params, x_train, y_train)),
      }
      if test is not None:
        record["test_accuracy"] = float(accuracy(params, *test))
      for name, value in record.items():
        history[name].append(value)
      _report(bar, callback, epoch, params, record)
  finally:
    if bar is not None:
      bar.close()
  return params, history


# ---------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------


def evaluate_classifier(
  params: Any,
  x: jax.typing.ArrayLike,
  y: jax.typing.ArrayLike,
  k: int = 5,
  *,
  model: ModelFn = linear_logits,
) -> dict[str, float]:
  """Accuracy and top-k accuracy of a classifier.

  Both come from `xentjax.metrics`, so they follow its tie rule: a label tied
  with ``t - 1`` other classes across the k-th place gets the fractional
  credit of a random tie break (a constant model scores ``k / K``). `k` is
  capped at the number of classes.

  Args:
    params: model parameters.
    x: inputs `[n, d]`.
    y: integer labels `[n]`.
    k: the k of top-k accuracy.
    model: `(params, x) -> logits [n, K]` (or `[n]` for a binary model, which
      reports only "accuracy").

  Returns:
    ``{"accuracy": float, "top_k_accuracy": float}``.
  """
  logits = model(params, jnp.asarray(x))
  y = jnp.asarray(y)
  out = {"accuracy": float(_accuracy_from_logits(logits, y))}
  if logits.ndim == y.ndim + 1:
    k = min(k, logits.shape[-1])
    out["top_k_accuracy"] = float(metrics.top_k_accuracy(logits, y, k=k))
  return out


def epochs_to_accuracy(
  history: Mapping[str, Sequence[float]], target: float, *, key: str = "train_accuracy"
) -> int | None:
  """The first epoch (counted from 1) whose `history[key]` reaches `target`, else None."""
  for epoch, value in enumerate(history[key], start=1):
    if value >= target:
      return epoch
  return None


def logit_gradient_gap(logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike) -> float:
  """Largest difference between autodiff and the closed-form CE gradient.

  For the summed softmax cross-entropy :math:`L = \\sum_i \\ell(z_i, y_i)`,
  :math:`\\partial L / \\partial z_i = \\mathrm{softmax}(z_i) - e_{y_i}`
  (:math:`\\hat y - y`). The sum, not the mean, is differentiated so no
  :math:`1/n` factor enters.

  Args:
    logits: `[n, K]`.
    labels: `[n]` integer classes.

  Returns:
    :math:`\\max |\\nabla_z L - (\\mathrm{softmax}(z) - \\mathrm{onehot}(y))|`
    as a Python float.
  """
  z = jnp.asarray(logits)
  y = jnp.asarray(labels)
  ce = make_loss("ce")
  autodiff = jax.grad(lambda z: jnp.sum(ce(z, y)))(z)
  closed = jax.nn.softmax(z, axis=-1) - jax.nn.one_hot(y, z.shape[-1], dtype=z.dtype)
  return float(jnp.max(jnp.abs(autodiff - closed)))
