"""Tests run on 8 simulated CPU devices, so sharded meshes can be checked on any machine.

Two tiers: `pytest` runs the fast tier; tests marked `slow` (most subprocess runs) run with
`pytest -m slow`, and `.ci/run` runs both. Compiled programs go to a persistent JAX compilation
cache shared with the subprocesses, so a tiny model compiled once is not compiled again."""

import os
import pathlib
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # tests run on the CPU even where libtpu is installed
# TFDS reads this when first imported: the datasets tests build from local text go to a throwaway
# directory, not ~/tensorflow_datasets.
os.environ.setdefault("TFDS_DATA_DIR", tempfile.mkdtemp(prefix="bigflax-tfds-"))
# Read by JAX in this process and in every `bigflax` subprocess the tests start.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(pathlib.Path(tempfile.gettempdir()) / "bigflax-test-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402

from bigflax.config import base  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def write_corpus(path: pathlib.Path) -> pathlib.Path:
  lines = [f"line {i}: the quick brown fox jumps over the lazy dog {i % 7}.\n" for i in range(800)]
  path.write_text("".join(lines))
  return path


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
  """A small plain-text corpus (~40 KB) built once per session: its local TFDS dataset is then
  built once too (the build is keyed by the file's path, size and time)."""
  return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


def bigflax_env(devices: int = 1) -> dict:
  """The environment of a `bigflax` subprocess with its own CPU device count (not the tests' 8)."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return env


def run_bigflax(*args, devices: int = 1, cwd=REPO, check: bool = True, timeout: int = 300,
                script=None):
  """`python -m bigflax ARGS` (or `python -c SCRIPT ARGS`) on `devices` CPU devices."""
  command = [sys.executable, *(["-c", script] if script else ["-m", "bigflax"]), *map(str, args)]
  result = subprocess.run(command, cwd=cwd, env=bigflax_env(devices), capture_output=True,
                          text=True, timeout=timeout)
  if check and result.returncode != 0:
    raise AssertionError(f"bigflax {' '.join(map(str, args))} failed:\n{result.stderr[-3000:]}")
  return result


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


def in_process(capsys, *argv) -> tuple[int, str, str]:
  """(exit code, stdout, stderr) of `bigflax ARGV` run in this process (`cli.main`)."""
  from bigflax import cli  # noqa: PLC0415 - only the tests that run commands need it
  try:
    cli.main([str(a) for a in argv])
    code = 0
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else 1
    if isinstance(e.code, str):
      print(e.code, file=sys.stderr)
  out, err = capsys.readouterr()
  return code, out, err
