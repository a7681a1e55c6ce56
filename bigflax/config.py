"""The base config: every field bigflax reads, with the defaults of the embedded experiment.

An experiment file (`experiments/NAME.py`) defines `get_config()` that starts from `base()` and
changes what it needs. This module is itself such a file: it is what `bigflax train` runs with no
`--config`, a small byte-level GPT on the Python standard library's own sources.

Fields are locked and typed (ml_collections), so `--config.a.b=value` with an unknown key or a
value of the wrong type fails while parsing flags; `validate` then checks the values make sense.
"""

import ml_collections

from bigflax import data, optim, sharding
from bigflax.errors import ConfigError
from bigflax.model import DTYPES, MLPS, NORMS, POSITIONS, REMAT_POLICIES


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = ""  # experiment name; empty = the config file's stem. Default workdir: runs/<name>.
  c.seed = 0
  c.steps = 600
  c.batch_size = 16
  c.grad_accum_steps = 1
  # Weight of the z-loss, mean log²Z of the softmax normalizer (PaLM: 1e-4); keeps logits from
  # drifting. 0 = off.
  c.z_loss = 0.0
  c.log_every = 10
  c.eval_every = 200
  c.eval_batches = 20
  # Checkpoints (WORKDIR/checkpoints/<step>/, Orbax, async) every checkpoint_every steps, at the
  # end and on SIGTERM/SIGINT; 0 = only then. `bigflax train` resumes from the latest one.
  c.checkpoint_every = 100
  c.keep_checkpoints = 3  # the latest K are kept
  c.keep_every = 0  # also keep every M-th step's checkpoint for good; 0 = off
  # A NaN/Inf gradient skips its update (counted in metrics as skipped_updates) instead of
  # stopping the run.
  c.skip_nonfinite = False
  # "A,B": a jax.profiler trace of train steps A..B (1-based, inclusive) into WORKDIR/profile/,
  # for TensorBoard's profile plugin or Perfetto (README, "Profiling"). "" = off.
  c.profile_steps = ""

  c.data = ml_collections.ConfigDict()
  # "" = text when data.path is set, else stdlib (the Python standard library's .py files);
  # text | stdlib | tfds:NAME (a prepared TFDS dataset: tfds:lm1b, tfds:c4/en:3.1.0)
  c.data.source = ""
  c.data.path = ""  # text: a file, a directory or a glob
  c.data.documents = "file"  # text: one document per file | paragraph (blank-line separated)
  c.data.data_dir = ""  # TFDS data dir (local builds are cached there); "" = TFDS's default
  c.data.train_split = "train"  # tfds: split names and the feature holding the text
  c.data.val_split = "validation"
  c.data.text_feature = "text"
  c.data.tokenizer = "byte"  # byte | char | sentencepiece
  c.data.tokenizer_model = ""  # sentencepiece: the .model file (tools/train_tokenizer.py)
  # packed: whole documents packed into rows with segment ids | windows: nanoGPT's random windows
  c.data.batching = "packed"
  c.data.prefetch = 2  # batches prepared ahead in a background thread; 0 = none
  c.data.val_fraction = 0.1  # text and stdlib: the share of the corpus that validates
  # Filled in from the corpus when empty (char tokenizer): the sorted distinct characters.
  c.data.charset = ""

  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 0  # 0 = the tokenizer's vocabulary size
  c.model.block_size = 128
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.embed_dim = 128
  c.model.mlp_dim = 0  # 0 = 4 * embed_dim
  # Fewer key/value heads than query heads: grouped-query attention (1: multi-query); 0 = all.
  c.model.num_kv_heads = 0
  c.model.dropout = 0.0
  c.model.use_bias = True  # biases of every projection and LayerNorm (GPT: on; Llama: off)
  c.model.tie_embeddings = True  # output projection = the token embedding (GPT-2: tied)
  c.model.norm = "layernorm"  # layernorm | rmsnorm
  c.model.norm_eps = 1e-5
  c.model.positions = "learned"  # learned (a table of block_size rows) | rope (rotary)
  c.model.rope_theta = 10000.0  # rope: the base of the rotation frequencies
  # gelu (exact erf) | gelu_tanh (GPT-2's tanh approximation, "gelu_new") | swiglu (Llama)
  c.model.mlp = "gelu_tanh"
  # One nn.scan over the layers (params stacked on a `layers` axis): compile time independent of
  # depth. bigflax.model.stack_layers / unstack_layers convert params between the two layouts.
  c.model.scan_layers = False
  # Activations the backward pass recomputes: none | full | save_dots | save_dots_no_batch
  c.model.remat = "none"
  # Causal attention in chunks of this many queries, each reading only the keys up to its end:
  # the fully masked blocks are never computed. 0 = all queries at once (one masked square).
  c.model.attention_chunk = 0
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"  # adamw | adam | sgd
  c.optimizer.learning_rate = 2e-3
  c.optimizer.schedule = "cosine"  # cosine | exponential | constant; all with linear warmup
  c.optimizer.warmup_steps = 50
  c.optimizer.decay_steps = 0  # cosine: steps to reach end_learning_rate; 0 = `steps`
  c.optimizer.end_learning_rate = 1e-4
  c.optimizer.decay_rate = 0.5  # exponential: factor per decay_transition_steps
  c.optimizer.decay_transition_steps = 1000
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.99
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.1
  c.optimizer.weight_decay_exclude = ("bias", "scale", "embedding")  # parameter leaf names
  c.optimizer.momentum = 0.9  # sgd
  c.optimizer.nesterov = False  # sgd
  c.optimizer.clip_norm = 1.0  # global-norm clipping; 0 = off

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1 = all devices not used by the other axes
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.rules = sharding.DEFAULT_RULES

  # Several processes (one per host or GPU) forming one run; see bigflax/distributed.py.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ""  # "host:port" of process 0; empty = auto / single
  c.distributed.num_processes = 0  # with coordinator_address: how many processes join
  c.distributed.process_id = -1  # with coordinator_address: this process, 0..num_processes-1
  c.distributed.auto_detect = True  # on a Cloud TPU VM or in a SLURM srun step, ask the cluster
  c.distributed.initialization_timeout = 300  # seconds to wait for every process to join
  c.distributed.heartbeat_timeout = 100  # seconds of silence after which a process counts as dead

  c.sample = ml_collections.ConfigDict()
  c.sample.prompt = "def "
  c.sample.max_new_tokens = 200
  c.sample.temperature = 0.8
  c.sample.top_k = 0  # 0 = off
  c.sample.top_p = 1.0  # 1.0 = off
  return c


def get_config() -> ml_collections.ConfigDict:
  config = base()
  config.name = "stdlib_bytes"
  return config


def _check(ok: bool, message: str):
  if not ok:
    raise ConfigError(message)


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first field whose value cannot work."""
  for key in ("steps", "batch_size", "grad_accum_steps", "log_every", "eval_every",
              "eval_batches", "model.block_size", "model.num_layers", "model.num_heads",
              "model.embed_dim", "sample.max_new_tokens"):
    value = c
    for part in key.split("."):
      value = value[part]
    _check(value > 0, f"config.{key} must be a positive integer, got {value}")
  _check(c.checkpoint_every >= 0 and c.keep_every >= 0 and c.keep_checkpoints > 0,
         "config.checkpoint_every and config.keep_every must be >= 0 and "
         "config.keep_checkpoints > 0")
  _check(not (c.keep_every and c.checkpoint_every) or c.keep_every % c.checkpoint_every == 0,
         f"config.keep_every={c.keep_every} must be a multiple of config.checkpoint_every="
         f"{c.checkpoint_every}, else no checkpoint falls on it")
  _check(c.data.tokenizer in data.TOKENIZERS,
         f"config.data.tokenizer={c.data.tokenizer!r} is unknown; choose one of "
         f"{sorted(data.TOKENIZERS)}")
  _check(0.0 < c.data.val_fraction < 1.0,
         f"config.data.val_fraction must be in (0, 1), got {c.data.val_fraction}")
  for key, choices in (("batching", data.BATCHINGS), ("documents", data.DOCUMENT_UNITS)):
    _check(c.data[key] in choices, f"config.data.{key}={c.data[key]!r} is unknown; choose one "
           f"of {sorted(choices)}")
  _check(c.data.prefetch >= 0, f"config.data.prefetch must be >= 0, got {c.data.prefetch}")
  _check(c.model.embed_dim % c.model.num_heads == 0,
         f"config.model.embed_dim={c.model.embed_dim} is not divisible by "
         f"config.model.num_heads={c.model.num_heads}; change one of them")
  _check(0.0 <= c.model.dropout < 1.0, f"config.model.dropout must be in [0, 1), got "
         f"{c.model.dropout}")
  kv_heads = c.model.num_kv_heads or c.model.num_heads
  _check(c.model.num_kv_heads >= 0 and c.model.num_heads % kv_heads == 0,
         f"config.model.num_kv_heads={c.model.num_kv_heads} must divide config.model.num_heads="
         f"{c.model.num_heads} (or be 0 for num_heads)")
  _check(c.model.positions != "rope" or (c.model.embed_dim // c.model.num_heads) % 2 == 0,
         "config.model.positions='rope' rotates pairs of dimensions and needs an even head "
         "dimension (config.model.embed_dim / config.model.num_heads)")
  profile_steps(c)  # raises on a malformed range
  _check(c.model.attention_chunk >= 0, "config.model.attention_chunk must be >= 0 (0 = off)")
  _check(c.z_loss >= 0, f"config.z_loss must be >= 0, got {c.z_loss}")
  for key, choices in (("norm", NORMS), ("positions", POSITIONS), ("mlp", MLPS),
                       ("remat", REMAT_POLICIES), ("dtype", DTYPES), ("param_dtype", DTYPES)):
    _check(c.model[key] in choices, f"config.model.{key}={c.model[key]!r} is unknown; choose "
           f"one of {sorted(choices)}")
  _check(c.optimizer.name in optim.OPTIMIZERS, f"config.optimizer.name="
         f"{c.optimizer.name!r} is unknown; choose one of {sorted(optim.OPTIMIZERS)}")
  _check(c.optimizer.schedule in optim.SCHEDULES, f"config.optimizer.schedule="
         f"{c.optimizer.schedule!r} is unknown; choose one of {sorted(optim.SCHEDULES)}")
  _check(c.optimizer.learning_rate > 0, "config.optimizer.learning_rate must be positive")
  _check(c.optimizer.warmup_steps >= 0, "config.optimizer.warmup_steps must be >= 0")
  horizon = c.optimizer.decay_steps or c.steps
  _check(c.optimizer.schedule != "cosine" or horizon > c.optimizer.warmup_steps,
         f"the cosine schedule decays over {horizon} steps (config.optimizer.decay_steps, or "
         f"config.steps when 0), which must exceed config.optimizer.warmup_steps="
         f"{c.optimizer.warmup_steps}; lower the warmup or lengthen the decay")
  d = c.distributed
  _check(not d.coordinator_address or (d.num_processes > 0 and 0 <= d.process_id < d.num_processes),
         f"config.distributed.coordinator_address={d.coordinator_address!r} needs "
         f"config.distributed.num_processes > 0 and 0 <= config.distributed.process_id < "
         f"num_processes, got num_processes={d.num_processes}, process_id={d.process_id}")
  _check(d.initialization_timeout > 0 and d.heartbeat_timeout > 0,
         "config.distributed.initialization_timeout and heartbeat_timeout must be positive")
  _check(0.0 <= c.sample.top_p <= 1.0 and c.sample.top_k >= 0 and c.sample.temperature >= 0,
         "config.sample: need temperature >= 0, top_k >= 0 and 0 <= top_p <= 1")


def profile_steps(c: ml_collections.ConfigDict) -> tuple[int, int] | None:
  """config.profile_steps as (first, last), or None when profiling is off."""
  if not c.profile_steps:
    return None
  try:
    first, last = (int(part) for part in c.profile_steps.split(","))
  except ValueError:
    first = last = 0
  _check(1 <= first <= last <= c.steps,
         f"config.profile_steps={c.profile_steps!r} must be 'A,B' with 1 <= A <= B <= "
         f"config.steps={c.steps}, e.g. --config.profile_steps=10,12")
  return first, last
