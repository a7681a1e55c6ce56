"""GPT-2 (`model_type: gpt2`, GPT2LMHeadModel): LayerNorm, learned positions, GELU, biases.

Its Conv1D layers store weights as [in, out], and one c_attn matrix holds query, key and value
side by side."""

import jax.numpy as jnp
import numpy as np

from bigflax.errors import InteropError

# transformers' activation_function → config.model.mlp
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
REQUIRED = {"norm": "layernorm", "positions": "learned", "use_bias": True}


def config_from_hf(hf: dict) -> dict:
  if hf.get("activation_function") not in ACTIVATIONS:
    raise InteropError(f"GPT-2 activation_function {hf.get('activation_function')!r} is not "
                       f"supported; supported: {sorted(ACTIVATIONS)}")
  if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
    raise InteropError("GPT-2 attention scaling other than 1/sqrt(head_dim) is not supported "
                       "(scale_attn_by_inverse_layer_idx / scale_attn_weights)")
  return {"vocab_size": hf["vocab_size"], "block_size": hf["n_positions"],
          "num_layers": hf["n_layer"], "num_heads": hf["n_head"], "embed_dim": hf["n_embd"],
          "mlp_dim": hf.get("n_inner") or 4 * hf["n_embd"], "num_kv_heads": 0,
          "norm": "layernorm", "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
          "positions": "learned", "mlp": ACTIVATIONS[hf["activation_function"]],
          "use_bias": True, "tie_embeddings": hf.get("tie_word_embeddings", True)}


def unsupported(cfg) -> str:
  problems = [f"model.{k}={v!r}" for k, v in REQUIRED.items() if getattr(cfg, k) != v]
  if cfg.mlp not in ACTIVATIONS.values():
    problems.append("model.mlp in {'gelu', 'gelu_tanh'}")
  if cfg.kv_heads != cfg.num_heads:
    problems.append("model.num_kv_heads=0")
  return ", ".join(problems)


def config_to_hf(cfg) -> dict:
  return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
          "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_layer": cfg.num_layers,
          "n_head": cfg.num_heads, "n_embd": cfg.embed_dim, "n_inner": cfg.mlp_dim,
          "activation_function": {"gelu_tanh": "gelu_new", "gelu": "gelu"}[cfg.mlp],
          "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
          "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout}


def canonical(name: str) -> str:
  """A tensor's name without the "transformer." prefix, which checkpoints saved from GPT2Model
  (like the original "gpt2") lack."""
  return name.removeprefix("transformer.")


def _concatenate(arrays, axis=0):
  # numpy for real tensors; jax.numpy when traced (interop.expected_shapes).
  return (np if isinstance(arrays[0], np.ndarray) else jnp).concatenate(arrays, axis=axis)


def _norm(tensors, name):
  return {"scale": tensors[f"{name}.weight"], "bias": tensors[f"{name}.bias"]}


def params_from_hf(tensors: dict[str, np.ndarray], cfg) -> dict:
  # Checkpoints saved from GPT2Model (like the original "gpt2") lack the "transformer." prefix.
  t = {canonical(k): v for k, v in tensors.items()}
  e, h, d = cfg.embed_dim, cfg.num_heads, cfg.head_dim
  params = {"token_embed": {"embedding": t["wte.weight"]},
            "position_embed": {"embedding": t["wpe.weight"]},
            "norm_final": _norm(t, "ln_f")}
  for i in range(cfg.num_layers):
    p = f"h.{i}."
    qkv = np.split(t[p + "attn.c_attn.weight"], 3, axis=1)
    qkv_bias = np.split(t[p + "attn.c_attn.bias"], 3)
    attn = {name: {"kernel": w.reshape(e, h, d), "bias": b.reshape(h, d)}
            for name, w, b in zip(("query", "key", "value"), qkv, qkv_bias)}
    attn["out"] = {"kernel": t[p + "attn.c_proj.weight"].reshape(h, d, e),
                   "bias": t[p + "attn.c_proj.bias"]}
    params[f"block_{i}"] = {
        "attn": attn, "norm_attn": _norm(t, p + "ln_1"), "norm_mlp": _norm(t, p + "ln_2"),
        "mlp": {"up": {"kernel": t[p + "mlp.c_fc.weight"], "bias": t[p + "mlp.c_fc.bias"]},
                "down": {"kernel": t[p + "mlp.c_proj.weight"], "bias": t[p + "mlp.c_proj.bias"]}}}
  if not cfg.tie_embeddings:
    params["lm_head"] = {"kernel": t["lm_head.weight"].T}
  return params


def params_to_hf(params, cfg) -> dict[str, np.ndarray]:
  e = cfg.embed_dim
  t = {"transformer.wte.weight": params["token_embed"]["embedding"],
       "transformer.wpe.weight": params["position_embed"]["embedding"],
       "transformer.ln_f.weight": params["norm_final"]["scale"],
       "transformer.ln_f.bias": params["norm_final"]["bias"]}
  for i in range(cfg.num_layers):
    b, p = params[f"block_{i}"], f"transformer.h.{i}."
    attn = b["attn"]
    t[p + "attn.c_attn.weight"] = _concatenate(
        [attn[n]["kernel"].reshape(e, e) for n in ("query", "key", "value")], axis=1)
    t[p + "attn.c_attn.bias"] = _concatenate(
        [attn[n]["bias"].reshape(e) for n in ("query", "key", "value")])
    t[p + "attn.c_proj.weight"] = attn["out"]["kernel"].reshape(e, e)
    t[p + "attn.c_proj.bias"] = attn["out"]["bias"]
    for hf_name, name in (("ln_1", "norm_attn"), ("ln_2", "norm_mlp")):
      t[p + hf_name + ".weight"], t[p + hf_name + ".bias"] = (b[name]["scale"], b[name]["bias"])
    t[p + "mlp.c_fc.weight"], t[p + "mlp.c_fc.bias"] = (b["mlp"]["up"]["kernel"],
                                                        b["mlp"]["up"]["bias"])
    t[p + "mlp.c_proj.weight"], t[p + "mlp.c_proj.bias"] = (b["mlp"]["down"]["kernel"],
                                                            b["mlp"]["down"]["bias"])
  if not cfg.tie_embeddings:
    t["lm_head.weight"] = params["lm_head"]["kernel"].T
  return t
