"""Tests run on 8 simulated CPU devices, so sharded meshes can be checked on any machine."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # tests run on the CPU even where libtpu is installed
# TFDS reads this when first imported: the datasets tests build from local text go to a throwaway
# directory, not ~/tensorflow_datasets.
os.environ.setdefault("TFDS_DATA_DIR", tempfile.mkdtemp(prefix="bigflax-tfds-"))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pathlib  # noqa: E402

import pytest  # noqa: E402

from bigflax.config import base  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture
def corpus_file(tmp_path):
  """A small plain-text corpus (~40 KB) built by the test itself."""
  lines = [f"line {i}: the quick brown fox jumps over the lazy dog {i % 7}.\n" for i in range(800)]
  path = tmp_path / "corpus.txt"
  path.write_text("".join(lines))
  return path


def tiny_config(data_path, **overrides):
  """A model small enough that a step takes milliseconds, on a single device."""
  c = base()
  c.name = "tiny"
  c.data.path = str(data_path)
  c.data.tokenizer = "char"
  c.steps = 4
  c.batch_size = 8
  c.log_every = 1
  c.eval_every = 2
  c.eval_batches = 2
  c.model.block_size = 16
  c.model.num_layers = 2
  c.model.num_heads = 2
  c.model.embed_dim = 32
  c.optimizer.warmup_steps = 1
  c.mesh.data = 1
  c.sample.max_new_tokens = 8
  c.update_from_flattened_dict(overrides)
  return c
