import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bigflax import optim
from bigflax.config import base
from bigflax.errors import ConfigError
from bigflax.model import ModelConfig, Transformer, stack_layers


def opt_config(**kw):
  c = base().optimizer
  for k, v in kw.items():
    c[k] = v
  return c


def test_cosine_schedule_warms_up_then_decays_to_end_value():
  c = opt_config(learning_rate=1e-3, warmup_steps=100, decay_steps=2000, end_learning_rate=1e-4)
  lr = optim.learning_rate_schedule(c, steps=2000)
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(lr(50), 5e-4, rtol=1e-5)
  np.testing.assert_allclose(lr(100), 1e-3, rtol=1e-5)
  np.testing.assert_allclose(lr(1050), (1e-3 + 1e-4) / 2, rtol=1e-4)  # cosine midpoint
  np.testing.assert_allclose(lr(2000), 1e-4, rtol=1e-5)


def test_exponential_and_constant_schedules():
  c = opt_config(schedule="exponential", learning_rate=1.0, warmup_steps=10,
                 decay_transition_steps=100, decay_rate=0.5, end_learning_rate=0.0)
  lr = optim.learning_rate_schedule(c, steps=1000)
  np.testing.assert_allclose([lr(10), lr(110), lr(210)], [1.0, 0.5, 0.25], rtol=1e-5)
  c = opt_config(schedule="constant", learning_rate=0.3, warmup_steps=3)
  lr = optim.learning_rate_schedule(c, steps=1000)
  np.testing.assert_allclose([lr(0), lr(3), lr(900)], [0.0, 0.3, 0.3], rtol=1e-6)


def test_weight_decay_skips_norms_biases_and_embeddings():
  params = {"token_embed": {"embedding": jnp.ones((4, 2))},
            "block": {"mlp": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
                      "ln": {"scale": jnp.ones(2)}}}
  mask = optim.decay_mask(params, ("bias", "scale", "embedding"))
  assert mask == {"token_embed": {"embedding": False},
                  "block": {"mlp": {"kernel": True, "bias": False}, "ln": {"scale": False}}}
  # Only the kernel shrinks under pure weight decay (zero gradients).
  tx = optim.make_optimizer(opt_config(learning_rate=0.1, warmup_steps=0, schedule="constant",
                                       weight_decay=0.5, clip_norm=0.0), steps=10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  assert float(updates["block"]["mlp"]["kernel"][0, 0]) < 0
  assert float(updates["block"]["mlp"]["bias"][0]) == 0
  assert float(updates["token_embed"]["embedding"][0, 0]) == 0


# The first update of each optimizer in closed form, for gradient g = 2w of sum(w²) at w = (3, -2):
# Adam's bias-corrected moments make it lr·g/(|g| + eps); AdamW adds lr·wd·w (decoupled); SGD
# with momentum starts from a zero trace, so its first step is plain lr·g.
FIRST_STEP = {
    "adam": lambda w, g, c: w - c.learning_rate * g / (np.abs(g) + c.eps),
    "adamw": lambda w, g, c: w - c.learning_rate * (g / (np.abs(g) + c.eps)
                                                   + c.weight_decay * w),
    "sgd": lambda w, g, c: w - c.learning_rate * g,
}


@pytest.mark.parametrize("name", sorted(FIRST_STEP))
def test_each_optimizers_first_update_is_its_formula(name):
  c = opt_config(name=name, learning_rate=0.1, warmup_steps=0, schedule="constant",
                 clip_norm=0.0, weight_decay=0.5)
  tx = optim.make_optimizer(c, steps=100)
  w = np.array([3.0, -2.0], np.float32)
  params = {"w": jnp.asarray(w)}
  grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(optax.apply_updates(params, updates)["w"],
                             FIRST_STEP[name](w, 2 * w, c), rtol=1e-6)


def test_every_optimizer_has_a_first_step_formula():
  # Muon's Newton-Schulz iteration has no closed form: its own tests are below.
  assert set(FIRST_STEP) | {"muon"} == set(optim.OPTIMIZERS)


def test_clipping_bounds_the_global_norm():
  tx = optim.make_optimizer(opt_config(name="sgd", momentum=0.0, learning_rate=1.0,
                                       warmup_steps=0, schedule="constant", clip_norm=1.0),
                            steps=10)
  params = {"w": jnp.zeros(3)}
  updates, _ = tx.update({"w": jnp.array([30.0, 40.0, 0.0])}, tx.init(params), params)
  np.testing.assert_allclose(optax.tree.norm(updates), 1.0, rtol=1e-5)


def muon_first_update(params, **kw):
  """The first update of name=muon (constant rate, no clipping, no decay unless given) for
  gradients drawn from N(0, 1)."""
  c = opt_config(name="muon", learning_rate=0.01, muon_learning_rate=0.02, warmup_steps=0,
                 schedule="constant", clip_norm=0.0, weight_decay=0.0, **kw)
  optim.check_config(c)
  tx = optim.make_optimizer(c, steps=10)
  keys = iter(jax.random.split(jax.random.key(1), 32))
  grads = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  return c, grads, updates


def singular_values(matrix):
  return np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)


def test_muon_orthogonalises_weight_matrices_and_adamw_keeps_the_rest():
  params = {"token_embed": {"embedding": jnp.ones((64, 16))},
            "block_0": {"mlp": {"up": {"kernel": jnp.ones((16, 64)), "bias": jnp.ones(64)}},
                        "norm_mlp": {"scale": jnp.ones(16)}},
            "lm_head": {"kernel": jnp.ones((16, 64))}}
  c, grads, updates = muon_first_update(params)
  # The kernel's update is -lr · (an orthogonal matrix) · sqrt(fan_out / fan_in): all its
  # singular values near one value (the quintic Newton-Schulz lands them in ~[0.7, 1.15]), where
  # the Gaussian gradient's spread over a factor of ~3.
  s = singular_values(updates["block_0"]["mlp"]["up"]["kernel"])
  scale = c.muon_learning_rate * np.sqrt(64 / 16)
  assert np.all((s > 0.6 * scale) & (s < 1.3 * scale)), s / scale
  g = singular_values(grads["block_0"]["mlp"]["up"]["kernel"])
  assert s.max() / s.min() < 2 < g.max() / g.min()
  # Embeddings, norms, biases and the output layer: AdamW's first step, -lr · g / (|g| + eps).
  for path in (("token_embed", "embedding"), ("block_0", "mlp", "up", "bias"),
               ("block_0", "norm_mlp", "scale"), ("lm_head", "kernel")):
    update, grad = updates, grads
    for key in path:
      update, grad = update[key], grad[key]
    np.testing.assert_allclose(update, -c.learning_rate * grad / (np.abs(grad) + c.eps),
                               rtol=1e-5, err_msg=str(path))


def test_muon_weight_decay_matches_adamws_per_step_shrink():
  params = {"mlp": {"up": {"kernel": jnp.ones((8, 8))}}, "lm_head": {"kernel": jnp.ones((8, 8))}}
  c = opt_config(name="muon", learning_rate=0.01, muon_learning_rate=0.02, warmup_steps=0,
                 schedule="constant", clip_norm=0.0, weight_decay=0.5)
  tx = optim.make_optimizer(c, steps=10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  for module in ("up", "lm_head"):  # Muon's and AdamW's matrices shrink alike: lr · wd · w
    leaf = updates["mlp"]["up"] if module == "up" else updates["lm_head"]
    np.testing.assert_allclose(leaf["kernel"], -0.01 * 0.5, rtol=1e-5)
  # weight_decay_exclude holds for Muon's matrices too.
  tx = optim.make_optimizer(opt_config(**{**c, "weight_decay_exclude": ("kernel",)}), steps=10)
  updates, _ = tx.update(zeros, tx.init(params), params)
  assert float(jnp.abs(updates["mlp"]["up"]["kernel"]).max()) == 0


def test_muon_treats_attention_kernels_as_matrices():
  # [embed, heads, head_dim] is the matrix [embed, heads·head_dim]; [heads, head_dim, embed] is
  # [heads·head_dim, embed]: the same gradient as a 3-D attention kernel or as the 2-D matrix gets
  # the same update.
  three_d = {"attn": {"query": {"kernel": jnp.zeros((16, 4, 8))},
                      "out": {"kernel": jnp.zeros((4, 8, 16))}}}
  _, grads, updates = muon_first_update(three_d)
  two_d = {"mlp": {"up": {"kernel": grads["attn"]["query"]["kernel"].reshape(16, 32)},
                   "down": {"kernel": grads["attn"]["out"]["kernel"].reshape(32, 16)}}}
  c = opt_config(name="muon", learning_rate=0.01, muon_learning_rate=0.02, warmup_steps=0,
                 schedule="constant", clip_norm=0.0, weight_decay=0.0)
  tx = optim.make_optimizer(c, steps=10)
  flat, _ = tx.update(two_d, tx.init(two_d), two_d)
  np.testing.assert_allclose(updates["attn"]["query"]["kernel"].reshape(16, 32),
                             flat["mlp"]["up"]["kernel"], rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(updates["attn"]["out"]["kernel"].reshape(32, 16),
                             flat["mlp"]["down"]["kernel"], rtol=1e-4, atol=1e-7)
  s = singular_values(updates["attn"]["query"]["kernel"].reshape(16, 32))
  assert s.max() / s.min() < 2


def test_muon_orthogonalises_each_layer_of_a_scanned_stack():
  layers = 3
  unscanned = {f"block_{i}": {"attn": {"query": {"kernel": jnp.zeros((16, 2, 8))}},
                              "mlp": {"up": {"kernel": jnp.zeros((16, 32))}}}
               for i in range(layers)}
  c, grads, updates = muon_first_update(unscanned)
  scanned = stack_layers(unscanned, layers)
  tx = optim.make_optimizer(c, steps=10)
  stacked, _ = tx.update(stack_layers(grads, layers), tx.init(scanned), scanned)
  # One orthogonalisation per layer: each layer's slice is that layer's own update (a whole-stack
  # orthogonalisation, or one over a [layers·in, out] matrix, would differ).
  for i in range(layers):
    for module in ("query", "up"):
      group = "attn" if module == "query" else "mlp"
      np.testing.assert_allclose(stacked["blocks"][group][module]["kernel"][i],
                                 updates[f"block_{i}"][group][module]["kernel"],
                                 rtol=1e-4, atol=1e-7)
  s = singular_values(stacked["blocks"]["mlp"]["up"]["kernel"][1])
  assert s.max() / s.min() < 2


def test_muon_takes_the_models_boxed_scanned_params():
  # The train state is created from flax-boxed params (LogicallyPartitioned, with a `layers` axis
  # when scanned) and updated with unboxed ones: the labels and dimension numbers see both.
  cfg = ModelConfig(vocab_size=32, block_size=8, num_layers=2, num_heads=2, embed_dim=16,
                    scan_layers=True)
  abstract = jax.eval_shape(Transformer(cfg).init, jax.random.key(0),
                            jnp.zeros((1, 8), jnp.int32))["params"]
  boxed = jax.tree.map(lambda x: jnp.full(x.shape, 0.1, x.dtype), abstract)
  assert isinstance(boxed["blocks"]["mlp"]["up"]["kernel"], nn.LogicallyPartitioned)
  c = opt_config(name="muon", warmup_steps=0, schedule="constant", clip_norm=0.0,
                 weight_decay=0.0)
  tx = optim.make_optimizer(c, steps=10)
  boxed_state = tx.init(boxed)
  state = nn.unbox(boxed_state)
  # The state's shardings come from the boxed state: one spec per leaf of the unboxed state (the
  # partitions' empty MaskedNodes not boxed, which would give them a sharding of their own).
  assert (jax.tree.structure(nn.get_partition_spec(boxed_state)).num_leaves
          == len(jax.tree.leaves(state)))
  jax.tree.map(lambda x, spec: None, state, nn.get_partition_spec(boxed_state))
  params = nn.unbox(boxed)
  keys = iter(jax.random.split(jax.random.key(2), 64))
  grads = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape), params)
  updates, _ = jax.jit(tx.update)(grads, state, params)  # eager, Newton-Schulz is op by op
  for layer in range(2):
    for group, module, shape in (("mlp", "up", (16, 64)), ("attn", "query", (16, 16))):
      s = singular_values(updates["blocks"][group][module]["kernel"][layer].reshape(shape))
      assert s.max() / s.min() < 2, (group, module, s)
  g = grads["token_embed"]["embedding"]
  np.testing.assert_allclose(updates["token_embed"]["embedding"],
                             -c.learning_rate * g / (np.abs(g) + c.eps), rtol=1e-5)


def test_muon_config_errors():
  c = opt_config(name="muon", warmup_steps=0, schedule="constant")
  tx = optim.make_optimizer(c, steps=10)
  with pytest.raises(ConfigError, match="found no weight matrices.*name='adamw'"):
    tx.init({"token_embed": {"embedding": jnp.ones((4, 2))}, "ln": {"scale": jnp.ones(2)}})
  with pytest.raises(ConfigError, match="muon_learning_rate must be positive"):
    optim.check_config(opt_config(name="muon", muon_learning_rate=0.0))
  with pytest.raises(ConfigError, match="muon_momentum must be in"):
    optim.check_config(opt_config(name="muon", muon_momentum=1.0))


@pytest.mark.parametrize("trainable, trained", [
    ("lora", {"lora_a", "lora_b", "classifier"}), ("head", {"classifier"}),
    ("all", {"kernel", "lora_a", "lora_b", "classifier", "scale"})])
def test_frozen_params_get_zero_updates_and_no_optimizer_state(trainable, trained):
  params = {"block": {"query": {"kernel": jnp.ones((4, 4)), "lora_a": jnp.ones((4, 2)),
                                "lora_b": jnp.ones((2, 4))}, "norm": {"scale": jnp.ones(4)}},
            "classifier": {"kernel": jnp.ones((4, 3))}}
  tx = optim.make_optimizer(opt_config(warmup_steps=0, schedule="constant"), steps=10)
  if trainable != "all":
    tx = optim.freeze(tx, trainable)
  state = tx.init(params)
  moments = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(state)
             if getattr(x, "ndim", 0) > 0]
  # Adam's two moments for each trained leaf and nothing for the others.
  assert len(moments) == 2 * sum(
      1 for p, _ in jax.tree_util.tree_leaves_with_path(params)
      if {k.key for k in p} & trained)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  for path, update in jax.tree_util.tree_leaves_with_path(updates):
    names = {k.key for k in path}
    assert bool(np.any(np.asarray(update))) == bool(names & trained), jax.tree_util.keystr(path)
