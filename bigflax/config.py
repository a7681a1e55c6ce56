"""The base config: every field bigflax reads, with the defaults of the embedded experiment.

An experiment file (`experiments/NAME.py`) defines `get_config()` that starts from `base()` and
changes what it needs. This module is itself such a file: it is what `bigflax train` runs with no
`--config`, a small byte-level GPT on the Python standard library's own sources.

Fields are locked and typed (ml_collections), so `--config.a.b=value` with an unknown key or a
value of the wrong type fails while parsing flags; `validate` then checks the run-level values
make sense. Each section is checked by the module that reads it (model: `ModelConfig` below and
bigflax.model's registries; data, optimizer, mesh: their modules), all of them by
`bigflax.run.check`. This module sits at the bottom of the import graph: it imports nothing of
bigflax but errors, so reading an experiment file or `bigflax --help` loads no JAX or TFDS.
"""

import ast
import dataclasses
import importlib.util
import inspect
import io
import pathlib
import tokenize

import ml_collections

from bigflax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model's fields and their defaults (`config.model`); checks itself when built.

  Option names (norm, positions, mlp, remat, dtype) are checked by bigflax.model, whose
  registries they select from."""
  vocab_size: int = 0  # 0 = the tokenizer's vocabulary, rounded up to a multiple of 128
  block_size: int = 128  # longest sequence (the context), and the length of the decoding cache
  num_layers: int = 4  # transformer blocks
  num_heads: int = 4  # query heads; head_dim = embed_dim / num_heads
  embed_dim: int = 128  # the residual stream's width
  mlp_dim: int = 0  # the MLP's hidden width; 0 = 4 * embed_dim
  # Fewer key/value heads than query heads: grouped-query attention (1: multi-query); 0 = all.
  num_kv_heads: int = 0
  # Dropout rate on embeddings, attention weights and each residual branch; 0 = off.
  dropout: float = 0.0
  use_bias: bool = True  # biases of every projection and LayerNorm (GPT: on; Llama: off)
  tie_embeddings: bool = True  # output projection = the token embedding (GPT-2: tied)
  norm: str = "layernorm"  # layernorm | rmsnorm
  norm_eps: float = 1e-5  # added to the variance inside the norm
  positions: str = "learned"  # learned (a table of block_size rows) | rope (rotary)
  rope_theta: float = 10000.0  # rope: the base of the rotation frequencies
  # gelu (exact erf) | gelu_tanh (GPT-2's tanh approximation, "gelu_new") | swiglu (Llama)
  mlp: str = "gelu_tanh"
  # One nn.scan over the layers (params stacked on a `layers` axis): compile time independent of
  # depth. bigflax.model.stack_layers / unstack_layers convert params between the two layouts.
  scan_layers: bool = False
  # Activations the backward pass recomputes instead of keeping (jax.checkpoint policies):
  # none | full | save_dots (keep matmul outputs) | save_dots_no_batch (keep weight-only matmuls)
  remat: str = "none"
  # xla attention in chunks of this many queries when the rows are longer; causal chunks read only
  # the keys up to their end (the fully masked blocks are never computed), and under remat each
  # chunk's f32 scores are recomputed in its own backward (one chunk's live, not all).
  # 0 = all queries at once (one masked square).
  attention_chunk: int = 1024
  # How attention is computed (bigflax.attention): xla (einsums; dropout, decoding, any device) |
  # flash (JAX's fused kernel: Pallas splash on TPU, cuDNN on GPU; no [length, length] scores in
  # memory, no attention dropout) | auto (flash where a kernel fits, else xla) | flash_interpret
  # (the TPU kernel in the Pallas interpreter, any device: slow, for tests)
  attention: str = "auto"
  # Compute dtype of activations and matmul inputs: float32 | bfloat16. Matmuls accumulate in
  # f32, and attention scores, softmax, logits and the loss are f32 whatever this is.
  dtype: str = "float32"
  param_dtype: str = "float32"  # storage dtype of the params (and so of the optimizer state)
  # True: each token attends to the earlier tokens of its segment (a decoder, GPT); False: to
  # every token of its segment (a bidirectional encoder, BERT; config.objective=mlm).
  causal: bool = True
  # > 0: a classifier (config.task=classify) of this many labels replaces the LM head, reading the
  # last real token's final state (causal) or the first token's (bidirectional). 0 = the LM head.
  num_labels: int = 0
  # LoRA adapters: set from config.finetune (not config.model; see FINETUNE_FIELDS).
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ("query", "value")
  # standard | mup: μP for Adam (Yang et al. 2022, "Tensor Programs V"): hidden matrices' init
  # std × sqrt(base/width) and their Adam learning rates × base/width, the output layer's input
  # × base/width, attention scores × 1/head_dim (sqrt(base head_dim)/head_dim), so the best
  # hyper-parameters found at mup_base_width hold at any embed_dim (grown with num_heads fixed).
  parametrization: str = "standard"
  mup_base_width: int = 128  # mup: the embed_dim at which μP is exactly the standard model

  def __post_init__(self):
    for name in ("block_size", "num_layers", "num_heads", "embed_dim"):
      require(getattr(self, name) > 0,
              f"config.model.{name} must be a positive integer, got {getattr(self, name)}")
    for name in ("vocab_size", "mlp_dim", "num_kv_heads", "attention_chunk"):
      require(getattr(self, name) >= 0, f"config.model.{name} must be >= 0, got "
              f"{getattr(self, name)}")
    require(self.embed_dim % self.num_heads == 0,
            f"config.model.embed_dim={self.embed_dim} is not divisible by config.model.num_heads="
            f"{self.num_heads}; change one of them")
    require(0.0 <= self.dropout < 1.0,
            f"config.model.dropout must be in [0, 1), got {self.dropout}")
    require(self.num_heads % self.kv_heads == 0,
            f"config.model.num_kv_heads={self.num_kv_heads} must divide config.model.num_heads="
            f"{self.num_heads} (or be 0 for num_heads)")
    require(self.positions != "rope" or self.head_dim % 2 == 0,
            "config.model.positions='rope' rotates pairs of dimensions and needs an even head "
            "dimension (config.model.embed_dim / config.model.num_heads)")
    require(self.norm_eps > 0 and self.rope_theta > 0,
            "config.model.norm_eps and config.model.rope_theta must be positive")
    require(not (self.attention.startswith("flash") and self.dropout),
            f"config.model.attention={self.attention!r} cannot drop attention weights inside the "
            "fused kernel; set config.model.dropout=0, or attention=auto (xla while training "
            "with dropout)")
    require(self.num_labels >= 0, f"config.model.num_labels must be >= 0 (0 = the LM head), got "
            f"{self.num_labels}")
    require(self.parametrization in PARAMETRIZATIONS, f"config.model.parametrization="
            f"{self.parametrization!r} is unknown; choose one of {sorted(PARAMETRIZATIONS)}")
    require(self.mup_base_width > 0, f"config.model.mup_base_width must be a positive width "
            f"(the embed_dim μP is tuned at, e.g. 128), got {self.mup_base_width}")
    object.__setattr__(self, "mlp_dim", self.mlp_dim or 4 * self.embed_dim)  # resolve the 0
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
    if self.lora_rank:
      self._check_lora()

  def _check_lora(self):
    widths = self.projection_widths
    require(self.lora_rank > 0, f"config.finetune.lora_rank must be >= 0 (0 = off), got "
            f"{self.lora_rank}")
    require(self.lora_alpha > 0, f"config.finetune.lora_alpha must be positive, got "
            f"{self.lora_alpha}")
    require(bool(self.lora_targets), "config.finetune.lora_targets is empty; name the projections "
            f"to adapt, among {tuple(widths)}")
    for name in self.lora_targets:
      require(name in widths, f"config.finetune.lora_targets names {name!r}, which is no "
              f"projection; choose among {tuple(widths)}")
      require(self.lora_rank <= min(widths[name]),
              f"config.finetune.lora_rank={self.lora_rank} exceeds the {name} projection's "
              f"width {min(widths[name])} ({widths[name][0]} → {widths[name][1]}); lower the rank "
              f"or drop {name!r} from config.finetune.lora_targets")

  @property
  def projection_widths(self) -> dict[str, tuple[int, int]]:
    """Each projection LoRA can adapt → (input width, output width)."""
    e, m, q, kv = self.embed_dim, self.mlp_dim, self.embed_dim, self.kv_heads * self.head_dim
    return {"query": (e, q), "key": (e, kv), "value": (e, kv), "out": (q, e), "up": (e, m),
            "gate": (e, m), "down": (m, e)}

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def attention_scale(self) -> float:
    """The factor on QKᵀ before the softmax: 1/sqrt(head_dim), or under μP sqrt(base head_dim) /
    head_dim. μP needs 1/head_dim (q and k become correlated in training, so QKᵀ grows like
    head_dim, not its root); the constant sqrt(base head_dim) makes it equal the standard scale
    at the base width, where μP is the standard model."""
    return self.head_dim ** -0.5 * self.width_ratio ** 0.5

  @property
  def width_ratio(self) -> float:
    """mup_base_width / embed_dim under μP (1 under standard): the factor on hidden matrices'
    Adam learning rates and on the output layer's input; its root scales their init std."""
    return PARAMETRIZATIONS[self.parametrization](self)

  @property
  def generates(self) -> bool:
    """Whether the model continues text: a causal LM (not an encoder, not a classifier)."""
    return self.causal and not self.num_labels

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @classmethod
  def from_config(cls, model_config, finetune=None) -> "ModelConfig":
    """From `config.model` (a ConfigDict or a dict) and, for the LoRA adapters,
    `config.finetune` (None: no adapters), checked. A field the config lacks (a config.json
    written before the field existed) takes its default."""
    fields = {f.name: model_config[f.name] for f in dataclasses.fields(cls)
              if f.name not in FINETUNE_FIELDS and f.name in model_config}
    if finetune is not None:
      fields.update({name: finetune[name] for name in FINETUNE_FIELDS})
    return cls(**fields)


# config.model.parametrization → the model's base width / its width (ModelConfig.width_ratio).
PARAMETRIZATIONS = {
    "standard": lambda cfg: 1.0,
    "mup": lambda cfg: cfg.mup_base_width / cfg.embed_dim,
}


# ModelConfig's fields that config.finetune sets (the adapters belong to fine-tuning, not to the
# architecture a run exports: a merged export has none).
FINETUNE_FIELDS = ("lora_rank", "lora_alpha", "lora_targets")


# Logical axis → mesh axes (config.mesh.rules). A logical name may map to several mesh axes; within
# one array a mesh axis is used at most once, by the first dimension that claims it (so
# activations [batch, length, embed] put fsdp on batch while parameters [embed, mlp] put it on
# embed). The logical names are the model's (bigflax/model.py), the mesh axes data, fsdp, tensor.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("lora", None),  # a LoRA adapter's rank: small, never split
)


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = ""  # experiment name; empty = the config file's stem. Default workdir: runs/<name>.
  c.seed = 0  # params init, dropout, data order: the same seed gives the same bits
  # Start from trained params instead of an init: a bigflax run directory (its params/ export,
  # or checkpoint STEP with "DIR:STEP") or a Hugging Face directory (GPT-2/Llama safetensors).
  # The model and tokenizer fields come from there; step 0 with a fresh optimizer. "" = off.
  c.init_from = ""
  c.steps = 1200  # optimizer updates in the run
  # Rows (sequences of model.block_size tokens) per optimizer update, over all devices and
  # processes, microbatches included: with grad_accum_steps=k each microbatch has batch_size/k.
  c.batch_size = 16
  # Microbatches per update, run one after another (lax.scan) with their gradients summed: the
  # update of the whole batch at 1/k of the activation memory.
  c.grad_accum_steps = 1
  # Weight of the z-loss, mean log²Z of the softmax normalizer (PaLM: 1e-4); keeps logits from
  # drifting. 0 = off.
  c.z_loss = 0.0
  # Compute the LM head's f32 logits and the loss in chunks of this many positions per row, one
  # chunk live at a time (recomputed in the backward pass), when the rows are longer: a long
  # context's logits need not fit whole. 0 = the whole row at once.
  c.loss_chunk = 1024
  # lm: a language model (config.objective) | classify: a label per example (model.num_labels)
  c.task = "lm"
  # lm: next_token (a causal decoder) | mlm (BERT's masked LM; needs model.causal=False)
  c.objective = "next_token"
  c.mlm = ml_collections.ConfigDict()
  c.mlm.mask_rate = 0.15  # the share of real tokens chosen for prediction (the loss reads those)
  c.mlm.mask_fraction = 0.8  # of the chosen: replaced by [MASK]
  c.mlm.random_fraction = 0.1  # of the chosen: replaced by a random token (the rest unchanged)
  # The [MASK] id: filled in by run.resolve (the first id past the tokenizer's); leave -1.
  c.mlm.mask_token_id = -1
  c.finetune = ml_collections.ConfigDict()
  # all | lora (the adapters, plus the classifier when task=classify) | head (the classifier
  # only); "" = lora when finetune.lora_rank > 0, else all. Frozen params get no optimizer state.
  c.finetune.trainable = ""
  # LoRA adapters' rank on the projections lora_targets names; 0 = off (Hu et al. 2021)
  c.finetune.lora_rank = ModelConfig.lora_rank
  c.finetune.lora_alpha = ModelConfig.lora_alpha  # adapters scale by lora_alpha / lora_rank
  # Projections that get adapters: query, key, value, out (attention), up, gate, down (MLP)
  c.finetune.lora_targets = ModelConfig.lora_targets
  c.log_every = 10  # steps between train records (metrics.jsonl, TensorBoard, progress bar)
  c.eval_every = 200  # steps between evaluations (and one at the end)
  # Val batches per evaluation (the same ones every time); 0 = every val token once.
  c.eval_batches = 20

  # What each evaluation measures besides the run's own val split (bigflax/evaluation/).
  c.eval = ml_collections.ConfigDict()
  # Named eval sets, ";"-separated, each evaluated every eval_every steps over eval_batches
  # batches (0 = all of it once): loss, perplexity, accuracy and bits per byte. `val` = the run's
  # own val split (logged as eval_loss, eval_bpb, …); NAME=KIND:WHERE (logged as eval/NAME/loss,
  # …) = every document of a source, read with config.data's other settings and the model's
  # tokenizer: text:PATH (file, directory or glob) | jsonl:GLOB | parquet:GLOB | cache:DIR (a
  # token cache of the model's tokenizer) | sft:PATH | tfds:NAME[:VERSION]:SPLIT, e.g.
  # "val;shakespeare=text:/d/tiny.txt;c4=tfds:c4/en:3.1.0:validation"
  c.eval.sets = "val"
  # lm-evaluation-harness tasks run during training ("hellaswag,lambada_openai"; needs
  # `pip install bigflax[eval]`), logged as harness/TASK/METRIC; "" = off.
  c.eval.harness_tasks = ""
  c.eval.harness_every = 0  # steps between harness runs (and one at the end); 0 = eval_every
  c.eval.harness_limit = 0  # examples per harness task; 0 = all
  c.eval.harness_batch_size = 0  # rows per harness forward pass; 0 = config.batch_size
  # A directory of lm-eval task YAML files besides lm_eval's own (local, offline tasks); "" = none
  c.eval.harness_include = ""

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
  # text | stdlib | tfds:NAME (a prepared TFDS dataset: tfds:lm1b, tfds:c4/en:3.1.0) |
  # parquet | jsonl (shards: .jsonl, .jsonl.gz, .jsonl.zst) | cache (tools/prepare_data.py's) |
  # sft (fine-tuning examples: prompt/completion or messages, the loss on the answers only)
  c.data.source = ""
  # text: a file, a directory or a glob | parquet, jsonl: a glob of shards, local or gs://… |
  # cache: the token cache directory | sft, and task=classify: JSON lines or CSV examples
  c.data.path = ""
  c.data.download_hint = ""  # where to get data.path when it is missing (said in the error)
  c.data.documents = "file"  # text: one document per file | paragraph (blank-line separated)
  c.data.data_dir = ""  # TFDS data dir (local builds are cached there); "" = TFDS's default
  c.data.train_split = "train"  # tfds: the split that trains
  c.data.val_split = "validation"  # tfds: the split that validates
  # tfds: the feature holding each document's text | parquet: the column | jsonl: the field
  c.data.text_feature = "text"
  # parquet, jsonl, cache, mixture sources: the last N shards (in sorted order) validate
  c.data.val_shards = 1
  # parquet, jsonl: a separate glob of val shards | cache: a val cache directory | sft,
  # task=classify: val examples; "" = val_shards (sft, classify: the last val_fraction examples)
  c.data.val_path = ""
  # "NAME=GLOB:WEIGHT;…": train on a mix of sources by weight (token shares), each a shard glob
  # or a token cache directory, e.g. "web=/d/web/*.parquet:0.7;code=gs://b/code/*.jsonl.gz:0.3";
  # each source's last val_shards shards validate. "" = config.data.source alone.
  c.data.mixture = ""
  # byte | char | sentencepiece | hf (a Hugging Face tokenizer.json, e.g. an imported GPT-2's)
  c.data.tokenizer = "byte"
  # sentencepiece: the .model file (tools/train_tokenizer.py) | hf: the directory holding
  # tokenizer.json (and tokenizer_config.json: special tokens, chat template)
  c.data.tokenizer_model = ""
  # packed: whole documents packed into rows with segment ids | windows: nanoGPT's random windows
  c.data.batching = "packed"
  c.data.prefetch = 2  # batches prepared ahead in a background thread; 0 = none
  # text and stdlib: the share of the corpus that validates | sft, classify: of the examples
  c.data.val_fraction = 0.1
  # Filled in from the corpus when empty (char tokenizer): the sorted distinct characters.
  c.data.charset = ""
  # task=classify: the label of each class id. Filled in from the training examples when empty
  # (their sorted distinct labels); a label outside it at eval or predict time is an error.
  c.data.labels = ()

  # Every field and default of the model lives in ModelConfig above (one source for both).
  c.model = ml_collections.ConfigDict({f.name: f.default for f in dataclasses.fields(ModelConfig)
                                       if f.name not in FINETUNE_FIELDS})

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"  # adamw | adam | sgd | muon (weight matrices; AdamW for the rest)
  c.optimizer.learning_rate = 3e-3  # the peak, reached after warmup_steps
  c.optimizer.schedule = "cosine"  # cosine | exponential | constant; all after linear warmup
  c.optimizer.warmup_steps = 50  # linear warmup from 0 to learning_rate over these steps
  c.optimizer.decay_steps = 0  # cosine: steps to reach end_learning_rate; 0 = `steps`
  c.optimizer.end_learning_rate = 1e-4  # cosine and exponential: the floor
  c.optimizer.decay_rate = 0.5  # exponential: factor per decay_transition_steps
  c.optimizer.decay_transition_steps = 1000  # exponential: steps per decay_rate factor
  c.optimizer.b1 = 0.9  # adam/adamw: decay of the first-moment (mean) estimate
  c.optimizer.b2 = 0.99  # adam/adamw: decay of the second-moment (variance) estimate
  c.optimizer.eps = 1e-8  # adam/adamw: added to the root of the second moment
  c.optimizer.weight_decay = 0.1  # adamw: decoupled decay, multiplied by the learning rate
  c.optimizer.weight_decay_exclude = ("bias", "scale", "embedding")  # parameter leaf names
  c.optimizer.momentum = 0.9  # sgd; 0 = none
  c.optimizer.nesterov = False  # sgd
  # muon: the peak learning rate of the weight matrices (on the same schedule as learning_rate,
  # which the embeddings, norms, biases and output layer keep with AdamW)
  c.optimizer.muon_learning_rate = 0.02
  c.optimizer.muon_momentum = 0.95  # muon: decay of the (Nesterov) momentum it orthogonalises
  c.optimizer.clip_norm = 1.0  # global-norm gradient clipping; 0 = off

  # The device mesh: data × fsdp × tensor = the number of devices (bigflax/sharding.py).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data parallel: batch split, params replicated; -1 = all devices left
  c.mesh.fsdp = 1  # FSDP (ZeRO-3): batch and params/optimizer state split over these devices
  c.mesh.tensor = 1  # tensor (Megatron) parallel: heads, MLP hidden and vocab split
  c.mesh.rules = DEFAULT_RULES  # logical axis → mesh axes; see DEFAULT_RULES above

  # Several processes (one per host or GPU) forming one run; see bigflax/distributed.py.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ""  # "host:port" of process 0; empty = auto / single
  c.distributed.num_processes = 0  # with coordinator_address: how many processes join
  c.distributed.process_id = -1  # with coordinator_address: this process, 0..num_processes-1
  c.distributed.auto_detect = True  # on a Cloud TPU VM or in a SLURM srun step, ask the cluster
  c.distributed.initialization_timeout = 300  # seconds to wait for every process to join
  c.distributed.heartbeat_timeout = 100  # seconds of silence after which a process counts as dead

  # The sample printed at the end of training, and `bigflax sample`'s defaults.
  c.sample = ml_collections.ConfigDict()
  c.sample.prompt = "def "  # text to continue
  c.sample.max_new_tokens = 200  # tokens to generate
  c.sample.temperature = 0.8  # softmax temperature; 0 = greedy
  c.sample.top_k = 0  # keep the k most likely tokens; 0 = off
  c.sample.top_p = 1.0  # nucleus: the smallest set of tokens with this much probability; 1 = off

  # Tracking besides metrics.jsonl and TensorBoard: Weights & Biases gets the same scalars and the
  # config (pip install "bigflax[wandb]"; WANDB_MODE=offline logs to WORKDIR/wandb/ without a
  # network, for `wandb sync` later).
  c.metrics = ml_collections.ConfigDict()
  c.metrics.wandb_project = ""  # the W&B project to log to; "" = off
  c.metrics.wandb_entity = ""  # the W&B team or user owning the project; "" = your default
  c.metrics.wandb_name = ""  # the run's name in W&B; "" = the workdir's name
  c.metrics.wandb_tags = ()  # the run's W&B tags, e.g. ("baseline", "shakespeare")
  return c


def get_config() -> ml_collections.ConfigDict:
  config = base()
  config.name = "stdlib_bytes"
  return config


def require(ok: bool, message: str) -> None:
  """A ConfigError with `message` unless `ok`: each section's checks read as a list of rules."""
  if not ok:
    raise ConfigError(message)


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first run-level field (and sample, distributed) whose value
  cannot work. The other sections are their modules' to check: see bigflax.run.check."""
  for key in ("steps", "batch_size", "grad_accum_steps", "log_every", "eval_every",
              "sample.max_new_tokens"):
    value = c
    for part in key.split("."):
      value = value[part]
    require(value > 0, f"config.{key} must be a positive integer, got {value}")
  require(c.eval_batches >= 0, f"config.eval_batches must be >= 0 (0 = the whole val split), "
         f"got {c.eval_batches}")
  for key in ("harness_every", "harness_limit", "harness_batch_size"):
    require(c.eval[key] >= 0, f"config.eval.{key} must be >= 0 (0 = the default), got "
           f"{c.eval[key]}")
  require(bool(c.eval.sets.strip()) or bool(c.eval.harness_tasks.strip()),
         "config.eval.sets is empty and no harness task is set: an evaluation would measure "
         "nothing; give config.eval.sets (e.g. 'val')")
  require(c.checkpoint_every >= 0 and c.keep_every >= 0 and c.keep_checkpoints > 0,
         "config.checkpoint_every and config.keep_every must be >= 0 and "
         "config.keep_checkpoints > 0")
  require(not (c.keep_every and c.checkpoint_every) or c.keep_every % c.checkpoint_every == 0,
         f"config.keep_every={c.keep_every} must be a multiple of config.checkpoint_every="
         f"{c.checkpoint_every}, else no checkpoint falls on it")
  profile_steps(c)  # raises on a malformed range
  require(c.z_loss >= 0, f"config.z_loss must be >= 0, got {c.z_loss}")
  d = c.distributed
  require(not d.coordinator_address
          or (d.num_processes > 0 and 0 <= d.process_id < d.num_processes),
         f"config.distributed.coordinator_address={d.coordinator_address!r} needs "
         f"config.distributed.num_processes > 0 and 0 <= config.distributed.process_id < "
         f"num_processes, got num_processes={d.num_processes}, process_id={d.process_id}")
  require(d.initialization_timeout > 0 and d.heartbeat_timeout > 0,
         "config.distributed.initialization_timeout and heartbeat_timeout must be positive")
  _check_metrics(c)
  s = c.sample
  require(s.temperature >= 0, f"config.sample.temperature must be >= 0 (0 = greedy), got "
         f"{s.temperature}")
  require(s.top_k >= 0, f"config.sample.top_k must be >= 0 (0 = off), got {s.top_k}")
  require(0.0 < s.top_p <= 1.0, f"config.sample.top_p must be in (0, 1] (1 = off), got {s.top_p}")


def _check_metrics(c: ml_collections.ConfigDict) -> None:
  """config.metrics: W&B, when asked for, must be installed (checked before anything trains)."""
  m = c.get("metrics")  # a config.json written before the section existed has none
  if m is None or not m.wandb_project:
    return
  require(all(isinstance(tag, str) and tag for tag in m.wandb_tags),
         f"config.metrics.wandb_tags must be non-empty strings, got {tuple(m.wandb_tags)!r}")
  require(importlib.util.find_spec("wandb") is not None,
         f"config.metrics.wandb_project={m.wandb_project!r} asks for Weights & Biases, which is "
         'not installed; pip install "bigflax[wandb]" (or set config.metrics.wandb_project="")')


def profile_steps(c: ml_collections.ConfigDict) -> tuple[int, int] | None:
  """config.profile_steps as (first, last), or None when profiling is off."""
  if not c.profile_steps:
    return None
  try:
    first, last = (int(part) for part in c.profile_steps.split(","))
  except ValueError:
    first = last = 0
  require(1 <= first <= last <= c.steps,
         f"config.profile_steps={c.profile_steps!r} must be 'A,B' with 1 <= A <= B <= "
         f"config.steps={c.steps}, e.g. --config.profile_steps=10,12")
  return first, last


def load_python_file(path: str, flag: str, what: str):
  """The module a user's Python file defines (an experiment, a search space); ConfigError naming
  `flag` and the file, in one line, when it is missing or fails to load."""
  file = pathlib.Path(path).expanduser()
  if not file.is_file():
    raise ConfigError(f"{flag} {path}: no such file; give {what}")
  module_spec = importlib.util.spec_from_file_location(f"user_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"{flag} {path}: syntax error at line {e.lineno}: {e.msg}") from None
  except Exception as e:  # noqa: BLE001 - any failure of the user's file is reported, one line
    raise ConfigError(f"{flag} {path}: the file failed to load ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); fix it and run "
                      "again") from None
  return module


def load_experiment(spec: str) -> ml_collections.ConfigDict:
  """The config of an experiment file, `PATH` or `PATH:ARG` (`get_config(ARG)`); ConfigError
  naming the file and the fix when it cannot be read."""
  path, _, arg = spec.partition(":")
  module = load_python_file(path, "--config", "an experiment file such as "
                            "experiments/shakespeare_char.py")
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"--config {path} defines no get_config(); an experiment file defines "
                      "get_config() returning bigflax.config.base() with its changes")
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except TypeError as e:
    raise ConfigError(f"--config {spec}: get_config({'arg' if arg else ''}) failed ({e}); "
                      f"{'drop' if arg else 'add'} the ':VARIANT' after the file name") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"--config {path}: get_config() returned a {type(config).__name__}, not an "
                      "ml_collections.ConfigDict; return bigflax.config.base() with changes")
  return config


def field_comments() -> dict[str, str]:
  """Each field's comment in this file ("model.dropout" → "Dropout rate on …"): the comment on its
  line, or the comment lines just above it. `bigflax config` prints them beside the values."""
  comments = {}
  for source, prefix, pattern in ((inspect.getsource(base), "", "assign"),
                                  (inspect.getsource(ModelConfig), "model.", "field")):
    lines = source.splitlines()
    notes = {t.start[0]: t.string.lstrip("# ").strip()
             for t in tokenize.generate_tokens(io.StringIO(source).readline)
             if t.type == tokenize.COMMENT}
    for node in ast.walk(ast.parse(source)):
      if pattern == "assign" and isinstance(node, ast.Assign):
        name = ast.unparse(node.targets[0]).removeprefix("c.")
      elif pattern == "field" and isinstance(node, ast.AnnAssign):
        name = prefix + ast.unparse(node.target)
      else:
        continue
      line = node.lineno
      above = []
      while line - 1 - len(above) in notes and lines[line - 2 - len(above)].strip().startswith("#"):
        above.insert(0, notes[line - 1 - len(above)])
      text = " ".join(above + [notes.get(node.end_lineno, "")]).strip()
      if text:
        comments[name] = text
  return comments


def describe(config: ml_collections.ConfigDict) -> str:
  """Every field of `config` with its value and comment, one per line: `bigflax config`."""
  comments = field_comments()
  lines = []

  def walk(node, prefix=""):
    for key in node.keys():
      value = node[key]
      if isinstance(value, ml_collections.ConfigDict):
        lines.append("")
        walk(value, f"{prefix}{key}.")
        continue
      name = f"{prefix}{key}"
      note = comments.get(name, "")
      lines.append(f"{name} = {value!r}" + (f"  # {note}" if note else ""))
  walk(config)
  return "\n".join(lines).strip() + "\n"
