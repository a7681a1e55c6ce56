"""config.model.attention: the fused kernels against the xla path (bigflax/attention.py).

On a CPU the TPU splash kernel runs in the Pallas interpreter (attention=flash_interpret): the
same kernel code and custom VJP as on a TPU, slowly, so the shapes here are the smallest the
kernel tiles (128 tokens, one block)."""

from dataclasses import replace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigflax import aot, attention, sharding
from bigflax.config import ModelConfig, base
from bigflax.decode import decode_step, init_cache, prefill
from bigflax.errors import ConfigError
from bigflax.model import Transformer

LENGTH = 128  # splash's smallest block


class Attend(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, q, k, v, segment_ids):
    return attention.attend(q, k, v, segment_ids, self.cfg, deterministic=True)


def run(cfg, q, k, v, segment_ids):
  """Output and the gradients of a weighted sum of it with respect to q, k and v."""
  weights = jax.random.normal(jax.random.key(9), q.shape)

  def loss(q, k, v):
    out = Attend(cfg).apply({}, q, k, v, segment_ids)
    return jnp.sum(out * weights), out

  grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


def qkv(heads, kv_heads, head_dim=32, batch=1):
  keys = jax.random.split(jax.random.key(0), 3)
  return (jax.random.normal(keys[0], (batch, LENGTH, heads, head_dim)),
          *(jax.random.normal(key, (batch, LENGTH, kv_heads, head_dim)) for key in keys[1:]))


# Two packed documents and a padded tail (segment 0) in one row.
PACKED = jnp.asarray(np.repeat([[1, 2, 0]], [50, 60, 18], axis=1))
ONE_DOC = jnp.ones((1, LENGTH), jnp.int32)


@pytest.mark.slow
@pytest.mark.parametrize("heads, kv_heads, segment_ids, causal", [
    (2, 2, ONE_DOC, True),
    (2, 2, PACKED, True),
    (4, 1, PACKED, True),  # grouped-query: 4 query heads share one K/V head
    (2, 2, PACKED, False),  # bidirectional (BERT): segment mask only
], ids=["causal", "packed", "gqa_packed", "bidirectional_packed"])
def test_flash_output_and_gradients_match_xla(heads, kv_heads, segment_ids, causal):
  cfg = ModelConfig(block_size=LENGTH, num_heads=heads, num_kv_heads=kv_heads,
                    embed_dim=32 * heads, causal=causal)
  q, k, v = qkv(heads, kv_heads)
  out_xla, grads_xla = run(replace(cfg, attention="xla"), q, k, v, segment_ids)
  out_flash, grads_flash = run(replace(cfg, attention="flash_interpret"), q, k, v, segment_ids)
  np.testing.assert_allclose(out_flash, out_xla, atol=1e-5)
  for name, flash, xla in zip("qkv", grads_flash, grads_xla):
    np.testing.assert_allclose(flash, xla, atol=1e-5, err_msg=f"d{name}")
  assert np.abs(np.asarray(grads_xla[1])).max() > 0.1  # the gradients carry signal


@pytest.mark.slow
def test_softmax_backward_from_the_weights_matches_jax():
  scores = jax.random.normal(jax.random.key(0), (2, 3, 8, 8))
  scores = jnp.where(jnp.tril(jnp.ones((8, 8), bool)), scores, jnp.finfo(jnp.float32).min)
  cotangent = jax.random.normal(jax.random.key(1), scores.shape)
  ours, theirs = (jax.vjp(f, scores) for f in (attention.softmax, jax.nn.softmax))
  np.testing.assert_allclose(ours[0], theirs[0], rtol=0, atol=0)
  np.testing.assert_allclose(ours[1](cotangent)[0], theirs[1](cotangent)[0], rtol=1e-6, atol=1e-6)


def test_flash_on_a_mesh_runs_on_each_devices_rows_and_heads():
  c = base()
  c.mesh.update(data=2, fsdp=1, tensor=2)
  q, k, v = qkv(2, 2, batch=2)
  segment_ids = jnp.concatenate([PACKED, ONE_DOC])
  cfg = ModelConfig(block_size=LENGTH, num_heads=2, embed_dim=64)
  with sharding.activate(sharding.make_mesh(c.mesh, jax.devices()[:4]), sharding.rules_of(c.mesh)):
    out_xla, grads_xla = run(replace(cfg, attention="xla"), q, k, v, segment_ids)
    out_flash, grads_flash = run(replace(cfg, attention="flash_interpret"), q, k, v, segment_ids)
  np.testing.assert_allclose(out_flash, out_xla, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads_flash, grads_xla)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_xla_attention_in_query_chunks_equals_the_whole_square(causal):
  """model.attention_chunk shorter than the rows (128 = 48 + 48 + 32): outputs and dq, dk, dv
  equal the whole square's. Under remat each chunk is checkpointed (its scores recomputed in its
  own backward); without remat none is, so the CPU's fast path is as it was."""
  cfg = ModelConfig(block_size=LENGTH, num_heads=4, num_kv_heads=2, embed_dim=128,
                    causal=causal, attention="xla", attention_chunk=0)
  q, k, v = qkv(4, 2)
  out_whole, grads_whole = run(cfg, q, k, v, PACKED)
  for remat, checkpoints in (("none", 0), ("full", 3)):
    chunked = replace(cfg, attention_chunk=48, remat=remat)
    out, grads = run(chunked, q, k, v, PACKED)
    np.testing.assert_allclose(out, out_whole, atol=1e-5)
    for name, got, want in zip("qkv", grads, grads_whole):
      np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"d{name}, remat={remat}")
    program = str(jax.make_jaxpr(lambda q: Attend(chunked).apply({}, q, k, v, PACKED))(q))
    assert program.count("remat2") == checkpoints


def model_config(**overrides):
  return ModelConfig(**{**dict(vocab_size=64, block_size=LENGTH, num_layers=1, num_heads=2,
                                num_kv_heads=1, embed_dim=32, mlp_dim=64, norm="rmsnorm",
                                positions="rope", mlp="swiglu", use_bias=False,
                                tie_embeddings=False), **overrides})


def test_a_scanned_rematerialised_model_with_checkpointed_chunks_trains_like_the_whole_square():
  """The chunks' jax.checkpoint nested in the blocks' nn.remat and nn.scan: the same loss and
  parameter gradients as attention_chunk=0."""
  tokens = jax.random.randint(jax.random.key(1), (2, LENGTH), 0, 64)
  cfg = model_config(num_layers=2, scan_layers=True, remat="full", attention="xla")

  def loss_and_grads(attention_chunk):
    model = Transformer(replace(cfg, attention_chunk=attention_chunk))
    params = nn.unbox(model.init(jax.random.key(0), tokens))["params"]
    return jax.jit(jax.value_and_grad(lambda p: jnp.mean(jax.nn.logsumexp(
        model.apply({"params": p}, tokens, segment_ids=jnp.concatenate([PACKED, ONE_DOC])), -1))))(
            params)

  (whole, whole_grads), (chunked, chunked_grads) = loss_and_grads(0), loss_and_grads(48)
  np.testing.assert_allclose(chunked, whole, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), chunked_grads,
               whole_grads)


@pytest.mark.slow
def test_a_model_with_flash_attention_trains_like_xla_and_decodes_through_the_cache():
  tokens = jax.random.randint(jax.random.key(1), (1, LENGTH), 0, 64)
  flash = Transformer(model_config(attention="flash_interpret"))
  xla = Transformer(model_config(attention="xla"))
  params = nn.unbox(xla.init(jax.random.key(0), tokens))["params"]

  def loss(model, params):
    logits = model.apply({"params": params}, tokens, segment_ids=PACKED)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
        logits, tokens[..., None], -1)[..., 0]), logits

  (loss_flash, logits_flash), grads_flash = jax.jit(
      jax.value_and_grad(lambda p: loss(flash, p), has_aux=True))(params)
  (loss_xla, logits_xla), grads_xla = jax.jit(
      jax.value_and_grad(lambda p: loss(xla, p), has_aux=True))(params)
  np.testing.assert_allclose(logits_flash, logits_xla, atol=1e-5)
  np.testing.assert_allclose(loss_flash, loss_xla, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads_flash, grads_xla)

  # Decoding always takes the xla path over the cache; it continues what flash computed.
  full = np.asarray(flash.apply({"params": params}, tokens))
  cache, logits = jax.jit(prefill, static_argnums=0)(flash, params, init_cache(flash, 1),
                                                     tokens[:, :100] * 1, jnp.asarray([100]))
  np.testing.assert_allclose(logits[0], full[0, 99], atol=1e-5)
  for position in (100, 101):
    cache, logits = jax.jit(decode_step, static_argnums=0)(
        flash, params, cache, tokens[:, position], jnp.asarray([position]))
    np.testing.assert_allclose(logits[0], full[0, position], atol=1e-5)


def test_auto_on_a_cpu_is_the_xla_path():
  q, k, v = qkv(2, 1, head_dim=16, batch=2)
  cfg = model_config()
  assert cfg.attention == "auto"
  out = Attend(cfg).apply({}, q, k, v, jnp.ones((2, LENGTH), jnp.int32))
  reference = Attend(model_config(attention="xla")).apply({}, q, k, v,
                                                          jnp.ones((2, LENGTH), jnp.int32))
  np.testing.assert_array_equal(out, reference)


@pytest.mark.parametrize("cfg, length, message", [
    (model_config(attention="flash"), LENGTH, r"attention='flash': there is no fused attention "
                                              r"kernel for the cpu backend .*flash_interpret"),
    (model_config(attention="flash_interpret", block_size=200), 200,
     r"tiles the sequence in blocks of 128, and the length 200 is no multiple of it; use "
     r"attention=auto"),
])
def test_flash_without_a_kernel_is_one_line_saying_why(cfg, length, message):
  q, k, v = (x[:, :1].repeat(length, axis=1) for x in qkv(2, 1, head_dim=16))
  with pytest.raises(ConfigError, match=message) as error:
    Attend(cfg).apply({}, q, k, v, jnp.ones((1, length), jnp.int32))
  assert "\n" not in str(error.value)


def test_flash_with_attention_dropout_is_refused_and_unknown_names_are_listed():
  with pytest.raises(ConfigError, match=r"attention='flash' cannot drop attention weights .*"
                                        r"model.dropout=0, or attention=auto"):
    model_config(attention="flash", dropout=0.1)
  with pytest.raises(ConfigError, match=r"config.model.attention='splash' is unknown; choose one "
                                        r"of \['auto', 'flash', 'flash_interpret', 'xla'\]"):
    Transformer(model_config(attention="splash"))


@pytest.mark.slow
def test_flash_attention_compiles_for_tpu_from_this_cpu():
  pytest.importorskip("libtpu", reason="libtpu is not installed, so nothing can be compiled for "
                      "TPU here: pip install -e '.[test]' installs it")
  c = base()
  c.model.update(vocab_size=256, block_size=LENGTH, num_kv_heads=2, attention="flash")
  c.batch_size = 8
  c.mesh.update(data=2, fsdp=2)
  run, lowered = aot.lower(c, aot._tpu_devices("v5e:2x2"))
  text = lowered.as_text()
  assert "tpu_custom_call" in text  # the Pallas (Mosaic) kernel, not XLA's einsums
  assert "shard_map" in text or "sdy.manual_computation" in text  # per device's rows
  assert lowered.compile().memory_analysis().temp_size_in_bytes > 0
