"""`xentjax demo --contrastive`: a CLIP-style model on two halves of the shipped digits.

The experiment (`notebooks/11_contrastive_and_mutual_information.ipynb` writes out
the same model and training loop, and checks its numbers against this module's):
each 8x8 digit is cut into two views, its top half (rows 0-3) and its bottom
half (rows 4-7), and two small encoders (32 -> 64 tanh -> 16, L2-normalized)
are trained with `xentjax.contrastive_loss` so that a top half finds its own
bottom half among a batch of others. The inverse temperature is learned as
``scale = exp(t)``, as CLIP does. Over training it records the loss, the
learned scale, the InfoNCE bound ``log B - L`` on the mutual information of
the two halves (`xentjax.info.infonce_lower_bound`), and the retrieval
accuracy among the held-out test digits, from the same sweep as their loss.
"""

from __future__ import annotations

import math
import time
from typing import Any

__all__ = [
  "BATCH",
  "EMBEDDING",
  "INITIAL_SCALE",
  "LEARNING_RATE",
  "LOG_EVERY",
  "STEPS",
  "WIDTH",
  "embed",
  "evaluate",
  "halves",
  "run",
  "table",
  "train",
]

WIDTH = 64
EMBEDDING = 16
BATCH = 256
STEPS = 600
LOG_EVERY = 100
LEARNING_RATE = 3e-3
INITIAL_SCALE = 10.0


def halves(x):
  """``(top, bottom)``: rows 0-3 and rows 4-7 of ``[n, 64]`` 8x8 images, each ``[n, 32]``."""
  return x[:, :32], x[:, 32:]


def _init(key):
  import jax
  import jax.numpy as jnp

  def encoder(k):
    k1, k2 = jax.random.split(k)
    return {
      "w1": jax.random.normal(k1, (32, WIDTH)) / math.sqrt(32),
      "b1": jnp.zeros((WIDTH,)),
      "w2": jax.random.normal(k2, (WIDTH, EMBEDDING)) / math.sqrt(WIDTH),
    }

  ka, kb = jax.random.split(key)
  return {"top": encoder(ka), "bottom": encoder(kb), "t": jnp.log(jnp.float32(INITIAL_SCALE))}


def embed(p, x):
  """Unit-norm embeddings ``[n, EMBEDDING]`` of one view."""
  import jax.numpy as jnp

  h = jnp.tanh(x @ p["w1"] + p["b1"][None, :]) @ p["w2"]
  return h / jnp.linalg.norm(h, axis=1, keepdims=True)


def evaluate(params, x, k=(1, 5)) -> dict[str, float]:
  """Loss, bound (nats) and retrieval accuracy of all pairs of ``x`` as one batch."""
  import xentjax

  top, bottom = halves(x)
  a, b = embed(params["top"], top), embed(params["bottom"], bottom)
  loss, acc = xentjax.contrastive_loss(a, b, scale=math.exp(float(params["t"])), retrieval_k=k)
  out = {"loss": float(loss), "bound": float(xentjax.info.infonce_lower_bound(loss, x.shape[0]))}
  for j, kk in enumerate(k):
    out[f"top{kk}_a_to_b"], out[f"top{kk}_b_to_a"] = float(acc.a_to_b[j]), float(acc.b_to_a[j])
  return out


def train(
  *, steps: int = STEPS, batch: int = BATCH, log_every: int = LOG_EVERY, seed: int = 0
) -> dict[str, Any]:
  """Train the two encoders; returns ``history`` (one dict per log step) and ``seconds``.

  Each history entry has the step, the training batch's loss, the learned
  scale, the bound ``log B - L`` in nats and bits on that batch, and the
  test set's loss and retrieval accuracy (`evaluate`, all 450 test digits as
  one batch: chance is 1/450 for top-1).
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import xentjax
  from xentjax import datasets

  start = time.perf_counter()
  x_train, _, x_test, _ = datasets.load_digits()
  opt = optax.adam(LEARNING_RATE)

  def loss_fn(p, x):
    top, bottom = halves(x)
    a, b = embed(p["top"], top), embed(p["bottom"], bottom)
    return xentjax.contrastive_loss(a, b, scale=jnp.exp(p["t"]))

  @jax.jit
  def step(p, state, x):
    loss, g = jax.value_and_grad(loss_fn)(p, x)
    updates, state = opt.update(g, state, p)
    return optax.apply_updates(p, updates), state, loss

  params = _init(jax.random.key(seed))
  state, rng, history = opt.init(params), np.random.default_rng(seed), []
  for i in range(1, steps + 1):
    idx = rng.choice(x_train.shape[0], size=batch, replace=False)
    params, state, loss = step(params, state, jnp.asarray(x_train[idx]))
    if i % log_every == 0 or i == 1:
      bound = float(xentjax.info.infonce_lower_bound(loss, batch))
      entry = {"step": i, "loss": float(loss), "scale": float(jnp.exp(params["t"]))}
      entry.update(bound=bound, bound_bits=bound / math.log(2))
      entry.update({"test_" + k: v for k, v in evaluate(params, x_test).items()})
      history.append(entry)
  return {"history": history, "params": params, "seconds": time.perf_counter() - start}


def table(history) -> str:
  """The training history as a plain-text table."""
  head = ["step", "loss", "scale", "bound (bits)", "test top-1 a->b", "b->a", "top-5 a->b"]
  rows = [
    [
      str(h["step"]),
      f"{h['loss']:.3f}",
      f"{h['scale']:.2f}",
      f"{h['bound_bits']:.2f}",
      f"{h['test_top1_a_to_b']:.3f}",
      f"{h['test_top1_b_to_a']:.3f}",
      f"{h['test_top5_a_to_b']:.3f}",
    ]
    for h in history
  ]
  widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]

  def line(r):
    return " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True))

  return "\n".join([line(head), "-+-".join("-" * w for w in widths), *(line(r) for r in rows)])


def run(args) -> int:
  """Entry point of `xentjax demo --contrastive` (parsing is done by `xentjax.cli._demo`)."""
  from xentjax.cli._common import own_demo_seed

  seed = own_demo_seed(args, "--contrastive", "trains its own model")
  print(
    "CLIP-style training on the 8x8 digits: top halves against bottom halves, two encoders "
    f"(32-{WIDTH}-{EMBEDDING}), batch {BATCH}, learned scale = exp(t), "
    "xentjax.contrastive_loss",
    flush=True,
  )
  r = train(seed=seed)
  print(table(r["history"]))
  last = r["history"][-1]
  print(
    f"bound log B - L = {last['bound_bits']:.2f} bits of the log2({BATCH}) = "
    f"{math.log2(BATCH):.0f} bits a batch of {BATCH} can certify"
  )
  print(f"test retrieval among 450 digits: top-1 {last['test_top1_a_to_b']:.3f} (chance 0.002)")
  print(f"wall time: {r['seconds']:.1f} s")
  return 0
