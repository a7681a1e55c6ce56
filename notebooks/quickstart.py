# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # bigflax quickstart
#
# Pretrain a small GPT, plot its loss, sample from it; import GPT-2 from Hugging Face, sample it,
# fine-tune it on a few question/answer pairs and measure what that changed, in bits per byte.
# Runs on a Colab CPU, GPU or TPU runtime (Runtime → Change runtime type): the steps and the
# device mesh follow the runtime. Everything here has a command-line twin (`bigflax train`,
# `bigflax sample`, `bigflax eval`), described in the repository's README.
#
# This notebook is `notebooks/quickstart.ipynb`, paired with `notebooks/quickstart.py` by
# [jupytext](https://jupytext.readthedocs.io): edit either, `jupytext --sync` the other.

# %% [markdown]
# ## Install
#
# From the repository (put its URL below). Skipped where bigflax is already installed, e.g. from a
# checkout with `pip install -e .`. On a GPU the pip install includes JAX's CUDA build, on a TPU
# JAX's TPU build (`jax[tpu]`), as the README says.

# %%
import glob
import importlib.util
import pathlib
import shutil
import subprocess
import sys

REPO_URL = "https://github.com/YOUR-ORG/bigflax.git"  # placeholder: the repository to install

if importlib.util.find_spec("bigflax") is None:  # a fresh Colab runtime
  subprocess.run(["git", "clone", "--depth=1", REPO_URL, "bigflax-repo"], check=True)
  # tools/ (convert_hf.py below) is not part of the package: keep the checkout beside it
  REPO = pathlib.Path("bigflax-repo").resolve()
  on_tpu = bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))
  PIP_ARGS = (f'"{REPO}[tpu]"' if on_tpu else
              f'"jax[cuda12]" "{REPO}"' if shutil.which("nvidia-smi") else f'"{REPO}"')
  # %pip install -q {PIP_ARGS}
  importlib.invalidate_caches()
else:  # installed from a checkout (pip install -e .): tools/ lies beside the package
  REPO = pathlib.Path(importlib.util.find_spec("bigflax").origin).resolve().parents[1]
assert (REPO / "tools" / "convert_hf.py").exists(), f"{REPO} is not a bigflax checkout"

# %% [markdown]
# ## The runtime and its mesh
#
# bigflax lays the devices out as a `(data, fsdp, tensor)` mesh (README, "Parallelism"). On a TPU
# the params and optimizer state are split over the chips (FSDP: `mesh.data=1, mesh.fsdp=-1`); on
# GPUs or a CPU every device gets a slice of the batch (data parallel: `mesh.data=-1`).
# Accelerators compute in bfloat16 (params and optimizer state stay float32).

# %%
import jax

PLATFORM = jax.devices()[0].platform  # "tpu", "gpu" or "cpu"
print(f"{jax.device_count()} × {jax.devices()[0].device_kind} ({PLATFORM})")


def for_this_runtime(config):
  """`config` with the mesh and compute dtype of the devices at hand, its batch a multiple of the
  device count."""
  if PLATFORM == "tpu":
    config.mesh.data, config.mesh.fsdp = 1, -1
  else:
    config.mesh.data, config.mesh.fsdp = -1, 1
  if PLATFORM != "cpu":
    config.model.dtype = "bfloat16"
  devices = jax.device_count()
  config.batch_size = -(-config.batch_size // devices) * devices
  return config


# %% [markdown]
# How long each stage trains: a CPU runs a short version of each (a few minutes in all).

# %% tags=["parameters"]
ACCELERATED = PLATFORM != "cpu"
PRETRAIN_STEPS = 1200 if ACCELERATED else 300  # the embedded default trains 1,200 steps
FINETUNE_STEPS = 200 if ACCELERATED else 20
WORKDIR = pathlib.Path("runs")

# %% [markdown]
# ## Pretrain the embedded default
#
# `bigflax.config.get_config()` is what `bigflax train` runs with no `--config`: a byte-level GPT
# (4 layers × 128) on the Python standard library's own `.py` files, found on this machine. Any
# field can change, as `--config.FIELD=VALUE` would; `bigflax config` lists them all.

# %%
from bigflax import train
from bigflax.config import get_config

PRETRAIN_DIR = WORKDIR / "stdlib_bytes"
config = get_config()
config.steps = PRETRAIN_STEPS
config.eval_every = max(PRETRAIN_STEPS // 6, 1)
config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, max(PRETRAIN_STEPS // 10, 1))
last_eval = train.train(for_this_runtime(config), str(PRETRAIN_DIR))
print(f"eval loss {last_eval['eval_loss']:.3f} nats/byte, {last_eval['eval_bpb']:.3f} bits/byte")

# %% [markdown]
# ## The loss curve
#
# Each run appends its train and eval records to `WORKDIR/metrics.jsonl` (and TensorBoard
# events beside it).

# %%
import matplotlib.pyplot as plt

from bigflax import rundir

records = rundir.read_metrics(str(PRETRAIN_DIR))
train_records = [r for r in records if r.get("loss") is not None]
eval_records = [r for r in records if r.get("eval_loss") is not None]
fig, ax = plt.subplots(figsize=(7, 4))
ax.plot([r["step"] for r in train_records], [r["loss"] for r in train_records], label="train")
ax.plot([r["step"] for r in eval_records], [r["eval_loss"] for r in eval_records], "o-",
        label="eval (val split)")
ax.set(xlabel="step", ylabel="loss (nats per byte)", title="stdlib_bytes")
ax.legend()
plt.show()

# %% [markdown]
# ## Sample
#
# `rundir.load_run` reads a run's config, model, final params and tokenizer; `decode.sample_text`
# continues a prompt with the KV-cache sampler (`bigflax sample --workdir DIR` does the same).

# %%
from bigflax import decode

_, model, params, tokenizer = rundir.load_run(str(PRETRAIN_DIR))
prompt = "def "
print(prompt + decode.sample_text(model, params, tokenizer, prompt, max_new_tokens=200,
                                  temperature=0.8, top_k=0, top_p=1.0, seed=0))

# %% [markdown]
# ## Import GPT-2 from Hugging Face
#
# Download GPT-2 (124M): its config, safetensors weights and tokenizer. This cell needs network
# (Colab has it; the notebook's test puts a tiny local model in `HF_DIR` instead).

# %%
HF_DIR = pathlib.Path("hf") / "gpt2"

# %% tags=["network"]
import huggingface_hub

huggingface_hub.snapshot_download(
    "openai-community/gpt2", local_dir=HF_DIR,
    allow_patterns=["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"])

# %% [markdown]
# `python tools/convert_hf.py to_bigflax HF_DIR GPT2_DIR` turns it into a bigflax run directory:
# `config.json`, `params/` and `tokenizer/` (its `tokenizer.json`). It writes into a new or empty
# directory only, so this cell converts once.

# %%
GPT2_DIR = WORKDIR / "gpt2"
if not GPT2_DIR.exists():
  converted = subprocess.run([sys.executable, REPO / "tools" / "convert_hf.py", "to_bigflax",
                              HF_DIR, GPT2_DIR], capture_output=True, text=True)
  print(converted.stdout + converted.stderr)
  converted.check_returncode()

# %% [markdown]
# Sample it with its own tokenizer (greedy):

# %%
_, gpt2, gpt2_params, gpt2_tokenizer = rundir.load_run(str(GPT2_DIR))
prompt = "The meaning of life is"
print(prompt + decode.sample_text(gpt2, gpt2_params, gpt2_tokenizer, prompt, max_new_tokens=32,
                                  temperature=0.0, top_k=0, top_p=1.0, seed=0))

# %% [markdown]
# ## Fine-tune
#
# Supervised fine-tuning (`data.source=sft`) reads JSON lines of `{"prompt", "completion"}`; the
# loss counts the completions only. Here: sums of two numbers, written by this cell, some held out.

# %%
import json
import random

SFT_DATA = pathlib.Path("sft")
SFT_DATA.mkdir(exist_ok=True)
pairs = random.Random(0).sample([(a, b) for a in range(100) for b in range(100)], 240)
examples = [{"prompt": f"Question: what is {a} plus {b}?\nAnswer:", "completion": f" {a + b}."}
            for a, b in pairs]
for name, part in (("train", examples[:200]), ("val", examples[200:])):
  with open(SFT_DATA / f"{name}.jsonl", "w") as f:
    f.writelines(json.dumps(example) + "\n" for example in part)
print(examples[0])

# %% [markdown]
# `config.init_from` starts the run from GPT-2's params and tokenizer (step 0, a fresh
# optimizer). `finetune.lora_rank` trains LoRA adapters on the attention's query and value
# projections and freezes the rest; the context is cut to 64 tokens, which these examples fit.

# %%
SFT_DIR = WORKDIR / "gpt2_sft"
sft = get_config()
sft.name = "gpt2_sft"
sft.init_from = str(GPT2_DIR)
sft.data.source = "sft"
sft.data.path, sft.data.val_path = str(SFT_DATA / "train.jsonl"), str(SFT_DATA / "val.jsonl")
sft.model.block_size = 64
sft.finetune.lora_rank = 8
sft.optimizer.learning_rate = 2e-3
sft.optimizer.warmup_steps = max(FINETUNE_STEPS // 10, 1)
sft.steps = FINETUNE_STEPS
sft.batch_size = 8
sft.eval_every = FINETUNE_STEPS
sft.eval_batches = 0  # all of the val examples
sft.sample.prompt = examples[-1]["prompt"]  # the closing sample: a held-out question
sft.sample.max_new_tokens = 8
sft.sample.temperature = 0.0
sft_eval = train.train(for_this_runtime(sft), str(SFT_DIR))

# %% [markdown]
# ## Merge the adapters
#
# `finetune.export(..., merge=True)` (`bigflax export --workdir DIR --output NEW --merge`) folds
# the LoRA adapters into GPT-2's weights and writes a plain run directory: what you would share,
# fine-tune further or convert back with `tools/convert_hf.py to_hf`.

# %%
from bigflax import finetune

MERGED_DIR = WORKDIR / "gpt2_sft_merged"
if not MERGED_DIR.exists():  # an export never writes over anything
  finetune.export(str(SFT_DIR), str(MERGED_DIR), merge=True)

# %% [markdown]
# ## Evaluate
#
# `evaluation.evaluate_workdir` is `bigflax eval --workdir DIR`: it evaluates a run's params on its
# eval sets (`config.eval.sets`) and writes `DIR/eval_final.json`. Here GPT-2 and its fine-tuned
# version read the held-out examples as an `sft:` set, so the loss counts the answers only; bits
# per byte compare models whatever their tokenizers.

# %%
from bigflax import evaluation

ANSWERS = f"answers=sft:{SFT_DATA / 'val.jsonl'}"


def on_the_answers(config):
  """The run's config, evaluated on the held-out answers in rows of 64 tokens."""
  config.eval.sets = ANSWERS
  config.eval_batches = 0
  config.model.block_size = 64
  config.batch_size = jax.device_count()


scores = {name: evaluation.evaluate_workdir(str(directory), override=on_the_answers,
                                            overwrite=True)["sets"]["answers"]
          for name, directory in (("GPT-2", GPT2_DIR), ("fine-tuned", MERGED_DIR))}
for name, metrics in scores.items():
  print(f"{name:>10}: {metrics['bpb']:.3f} bits per byte, token accuracy {metrics['accuracy']:.3f}")
