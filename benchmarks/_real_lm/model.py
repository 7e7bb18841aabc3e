"""A small causal transformer in plain JAX, trained with xentjax's fused loss.

Pre-norm blocks (attention, then a 4x GELU MLP), learned positions, an untied
head ``w [d, V]`` with a bias ``b [V]`` that starts at the log unigram
frequencies of the training tokens (the model starts at the unigram
perplexity, so a few minutes of training go into context, not into counting).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import xentjax


@dataclasses.dataclass(frozen=True)
class Config:
  vocab: int
  d: int
  layers: int
  heads: int
  context: int

  def describe(self) -> str:
    return f"d={self.d}, {self.layers} layers, {self.heads} heads, context {self.context}"


def _dense(key, fan_in, fan_out, scale=1.0):
  return scale * jax.random.normal(key, (fan_in, fan_out), jnp.float32) / np.sqrt(fan_in)


def init(cfg: Config, key, log_unigram: np.ndarray) -> dict:
  """Parameters: embeddings, blocks, the final norm, the head `w [d, V]` and bias `b [V]`."""
  keys = iter(jax.random.split(key, 4 + 4 * cfg.layers))
  d = cfg.d
  out_scale = 1.0 / np.sqrt(2 * cfg.layers)  # residual branches start small
  blocks = []
  for _ in range(cfg.layers):
    blocks.append(
      {
        "ln1": jnp.ones(d),
        "qkv": _dense(next(keys), d, 3 * d),
        "proj": _dense(next(keys), d, d, out_scale),
        "ln2": jnp.ones(d),
        "up": _dense(next(keys), d, 4 * d),
        "down": _dense(next(keys), 4 * d, d, out_scale),
      }
    )
  return {
    "embed": 0.02 * jax.random.normal(next(keys), (cfg.vocab, d)),
    "pos": 0.02 * jax.random.normal(next(keys), (cfg.context, d)),
    "blocks": blocks,
    "ln_f": jnp.ones(d),
    "ln_f_bias": jnp.zeros(d),
    "w": _dense(next(keys), d, cfg.vocab, 0.5),
    "b": jnp.asarray(log_unigram, jnp.float32),
  }


def _norm(h, g):
  h = h - h.mean(-1, keepdims=True)
  return g * h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-5)


def _attention(h, blk, heads):
  b, t, d = h.shape
  q, k, v = jnp.split(h @ blk["qkv"], 3, axis=-1)
  q, k, v = (a.reshape(b, t, heads, d // heads) for a in (q, k, v))
  s = jnp.einsum("bqhc,bkhc->bhqk", q, k) / np.sqrt(d // heads)
  causal = jnp.tril(jnp.ones((t, t), bool))
  s = jnp.where(causal, s, -jnp.inf)
  o = jnp.einsum("bhqk,bkhc->bqhc", jax.nn.softmax(s, axis=-1), v)
  return o.reshape(b, t, d) @ blk["proj"]


def hidden(params, tokens, cfg: Config):
  """Final hidden states `[B, T, d]` (after the last norm) of int tokens `[B, T]`."""
  h = params["embed"][tokens] + params["pos"][: tokens.shape[1]]
  for blk in params["blocks"]:
    h = h + _attention(_norm(h, blk["ln1"]), blk, cfg.heads)
    u = _norm(h, blk["ln2"]) @ blk["up"]
    h = h + jax.nn.gelu(u) @ blk["down"]
  return _norm(h, params["ln_f"]) + params["ln_f_bias"]


def loss(params, tokens, cfg: Config):
  """Mean next-token cross-entropy (nats) of windows `[B, T + 1]`, by the fused loss."""
  h = hidden(params, tokens[:, :-1], cfg)
  y = tokens[:, 1:]
  return xentjax.linear_softmax_cross_entropy(
    h.reshape(-1, cfg.d), params["w"], y.reshape(-1), bias=params["b"]
  )
