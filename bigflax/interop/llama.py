"""Llama (`model_type: llama`, LlamaForCausalLM): RMSNorm, rotary positions in the "rotate half"
layout, SwiGLU, grouped-query attention, no biases by default.

torch Linear weights are [out, in]; bigflax keeps per-head kernels, e.g. query [embed, heads,
head_dim], so each conversion is a transpose and a reshape."""

import numpy as np

from bigflax.errors import InteropError

REQUIRED = {"norm": "rmsnorm", "positions": "rope", "mlp": "swiglu"}
ATTENTION = (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"))
MLP = (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj"))


def _rope_theta(hf: dict) -> float:
  # transformers ≥ 5 nests rope settings in rope_parameters; older configs have rope_theta.
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  if rope.get("rope_type", rope.get("type", "default")) != "default":
    raise InteropError(f"Llama rope scaling {rope} is not supported (only plain RoPE)")
  return rope.get("rope_theta", hf.get("rope_theta", 10000.0))


def config_from_hf(hf: dict) -> dict:
  heads, embed = hf["num_attention_heads"], hf["hidden_size"]
  if hf.get("hidden_act", "silu") != "silu":
    raise InteropError(f"Llama hidden_act {hf['hidden_act']!r} is not supported (only silu)")
  if hf.get("head_dim", embed // heads) != embed // heads:
    raise InteropError(f"Llama head_dim {hf['head_dim']} ≠ hidden_size / num_attention_heads is "
                       "not supported")
  if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
    raise InteropError("Llama with attention_bias ≠ mlp_bias is not supported (bigflax has one "
                       "model.use_bias)")
  return {"vocab_size": hf["vocab_size"], "block_size": hf["max_position_embeddings"],
          "num_layers": hf["num_hidden_layers"], "num_heads": heads, "embed_dim": embed,
          "mlp_dim": hf["intermediate_size"],
          "num_kv_heads": hf.get("num_key_value_heads") or heads, "norm": "rmsnorm",
          "norm_eps": hf.get("rms_norm_eps", 1e-6), "positions": "rope",
          "rope_theta": _rope_theta(hf), "mlp": "swiglu",
          "use_bias": hf.get("attention_bias", False),
          "tie_embeddings": hf.get("tie_word_embeddings", False)}


def unsupported(cfg) -> str:
  return ", ".join(f"model.{k}={v!r}" for k, v in REQUIRED.items() if getattr(cfg, k) != v)


def config_to_hf(cfg) -> dict:
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
          "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.block_size,
          "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
          "num_key_value_heads": cfg.kv_heads, "hidden_size": cfg.embed_dim,
          "head_dim": cfg.head_dim, "intermediate_size": cfg.mlp_dim, "hidden_act": "silu",
          "rms_norm_eps": cfg.norm_eps, "attention_bias": cfg.use_bias,
          "mlp_bias": cfg.use_bias, "tie_word_embeddings": cfg.tie_embeddings,
          "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
          "rope_theta": cfg.rope_theta, "attention_dropout": cfg.dropout}


def canonical(name: str) -> str:
  return name


def _heads(cfg, name):
  return cfg.num_heads if name == "query" else cfg.kv_heads


def params_from_hf(t: dict[str, np.ndarray], cfg) -> dict:
  e, d = cfg.embed_dim, cfg.head_dim
  params = {"token_embed": {"embedding": t["model.embed_tokens.weight"]},
            "norm_final": {"scale": t["model.norm.weight"]}}
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    attn = {}
    for name, hf_name in ATTENTION:
      h = _heads(cfg, name)
      attn[name] = {"kernel": t[f"{p}self_attn.{hf_name}.weight"].T.reshape(e, h, d)}
      if cfg.use_bias:
        attn[name]["bias"] = t[f"{p}self_attn.{hf_name}.bias"].reshape(h, d)
    attn["out"] = {"kernel": t[p + "self_attn.o_proj.weight"].T.reshape(cfg.num_heads, d, e)}
    mlp = {name: {"kernel": t[f"{p}mlp.{hf_name}.weight"].T} for name, hf_name in MLP}
    if cfg.use_bias:
      attn["out"]["bias"] = t[p + "self_attn.o_proj.bias"]
      for name, hf_name in MLP:
        mlp[name]["bias"] = t[f"{p}mlp.{hf_name}.bias"]
    params[f"block_{i}"] = {"attn": attn, "mlp": mlp,
                            "norm_attn": {"scale": t[p + "input_layernorm.weight"]},
                            "norm_mlp": {"scale": t[p + "post_attention_layernorm.weight"]}}
  if not cfg.tie_embeddings:
    params["lm_head"] = {"kernel": t["lm_head.weight"].T}
  return params


def params_to_hf(params, cfg) -> dict[str, np.ndarray]:
  e = cfg.embed_dim
  t = {"model.embed_tokens.weight": params["token_embed"]["embedding"],
       "model.norm.weight": params["norm_final"]["scale"]}
  for i in range(cfg.num_layers):
    b, p = params[f"block_{i}"], f"model.layers.{i}."
    for name, hf_name in ATTENTION:
      t[f"{p}self_attn.{hf_name}.weight"] = b["attn"][name]["kernel"].reshape(e, -1).T
      if cfg.use_bias:
        t[f"{p}self_attn.{hf_name}.bias"] = b["attn"][name]["bias"].reshape(-1)
    t[p + "self_attn.o_proj.weight"] = b["attn"]["out"]["kernel"].reshape(-1, e).T
    for name, hf_name in MLP:
      t[f"{p}mlp.{hf_name}.weight"] = b["mlp"][name]["kernel"].T
      if cfg.use_bias:
        t[f"{p}mlp.{hf_name}.bias"] = b["mlp"][name]["bias"]
    if cfg.use_bias:
      t[p + "self_attn.o_proj.bias"] = b["attn"]["out"]["bias"]
    t[p + "input_layernorm.weight"] = b["norm_attn"]["scale"]
    t[p + "post_attention_layernorm.weight"] = b["norm_mlp"]["scale"]
  if not cfg.tie_embeddings:
    t["lm_head.weight"] = params["lm_head"]["kernel"].T
  return t
