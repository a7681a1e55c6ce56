"""Named architectures from the papers, as functions that set `config.model` fields.

Sizes are the published ones; the shapes (layers × heads × width, MLP width, vocabulary, context)
are what matter for planning memory and FLOPs. Select one with the experiment file
`experiments/preset.py:NAME`, e.g. `bigflax train --config experiments/preset.py:gpt2_124m`;
`--config.model.FIELD=...` still overrides any field afterwards.

Like the TPU and GPU training frameworks, the presets compute in bfloat16 with float32 params
(so f32 optimizer state) and f32 attention softmax, logits and loss (bigflax.model keeps those in
f32 whatever the compute dtype): half the activation memory, and the matrix units' full rate.
The small CPU experiments stay float32.
"""

import functools

from bigflax.errors import ConfigError

GPT2_VOCAB = 50257  # GPT-2's byte-level BPE, also used by GPT-3
LLAMA2_VOCAB = 32000  # Llama 2's sentencepiece model
MIXED_PRECISION = {"dtype": "bfloat16", "param_dtype": "float32"}


def _gpt(model, *, num_layers: int, num_heads: int, embed_dim: int, block_size: int) -> None:
  """GPT-2 (Radford et al. 2019) / GPT-3 (Brown et al. 2020): pre-LayerNorm, learned positions,
  tanh-GELU MLP of 4× width, biases, output projection tied to the token embedding."""
  model.update(vocab_size=GPT2_VOCAB, block_size=block_size, num_layers=num_layers,
               num_heads=num_heads, num_kv_heads=0, embed_dim=embed_dim, mlp_dim=4 * embed_dim,
               norm="layernorm", norm_eps=1e-5, positions="learned", mlp="gelu_tanh",
               use_bias=True, tie_embeddings=True, **MIXED_PRECISION)


def _llama2(model, *, num_layers: int, num_heads: int, embed_dim: int, mlp_dim: int,
            num_kv_heads: int = 0) -> None:
  """Llama 2 (Touvron et al. 2023): RMSNorm, RoPE (θ = 10000), SwiGLU, no biases, untied output;
  the 70B model uses grouped-query attention with 8 key/value heads."""
  model.update(vocab_size=LLAMA2_VOCAB, block_size=4096, num_layers=num_layers,
               num_heads=num_heads, num_kv_heads=num_kv_heads, embed_dim=embed_dim,
               mlp_dim=mlp_dim, norm="rmsnorm", norm_eps=1e-5, positions="rope",
               rope_theta=10000.0, mlp="swiglu", use_bias=False, tie_embeddings=False,
               **MIXED_PRECISION)


PRESETS = {
    "gpt2_124m": functools.partial(_gpt, num_layers=12, num_heads=12, embed_dim=768,
                                   block_size=1024),
    "gpt2_355m": functools.partial(_gpt, num_layers=24, num_heads=16, embed_dim=1024,
                                   block_size=1024),
    "gpt2_774m": functools.partial(_gpt, num_layers=36, num_heads=20, embed_dim=1280,
                                   block_size=1024),
    "gpt2_1.5b": functools.partial(_gpt, num_layers=48, num_heads=25, embed_dim=1600,
                                   block_size=1024),
    "gpt3_175b": functools.partial(_gpt, num_layers=96, num_heads=96, embed_dim=12288,
                                   block_size=2048),
    "llama2_7b": functools.partial(_llama2, num_layers=32, num_heads=32, embed_dim=4096,
                                   mlp_dim=11008),
    "llama2_13b": functools.partial(_llama2, num_layers=40, num_heads=40, embed_dim=5120,
                                    mlp_dim=13824),
    "llama2_70b": functools.partial(_llama2, num_layers=80, num_heads=64, embed_dim=8192,
                                    mlp_dim=28672, num_kv_heads=8),
}


def apply(name: str, config) -> None:
  """Sets config.model to the preset `name`; an unknown name is a UserError listing the known."""
  if name not in PRESETS:
    raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
  PRESETS[name](config.model)
