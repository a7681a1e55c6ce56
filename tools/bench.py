"""Train-step throughput and MFU of an experiment on this machine.

    python tools/bench.py --config experiments/shakespeare_char.py:baby [--config.FIELD=VALUE]
        [--steps 20] [--compare FIELD=VALUE[,FIELD=VALUE] ...] [--against torch]

Reports, after compilation: the median (min, max) step time over --steps steps, the training
loop's time per step (input pipeline and dispatch included) and its overhead, tokens/s, model
FLOPs per token (bigflax/flops.py's formula, checked against XLA's cost_analysis of the same
compiled step), achieved FLOP/s and MFU — against the accelerator's datasheet peak, or on a CPU
against this machine's XLA matmul ceiling measured in the same run (f32 and bf16→f32; MFU uses the
model's compute dtype).

--compare runs variants of the config side by side: their steps alternate with the base config's,
so a shared machine's changing load hits all of them alike, and the ratio of median step times is
what to quote (e.g. --compare model.attention_chunk=0 --compare model.dtype=bfloat16).

--against torch times the same-shape GPT in PyTorch (transformers' GPT2LMHeadModel with the
config's layers, heads, widths, vocabulary, activation, dropout and tied embeddings; torch.optim
AdamW with the config's betas, eps and weight decay; clipping at clip_norm) on the same batches,
its steps alternating with bigflax's, and reports its median and how many times the speed of
PyTorch bigflax is (bfloat16 configs run torch under CPU autocast). torch and transformers are
imported only then (test extras).
"""

import copy
import dataclasses
import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from bigflax import config as config_lib, data, flops, hardware
from bigflax.layers import DTYPES
from bigflax.train import Trainer

_CONFIG = config_flags.DEFINE_config_file("config", config_lib.__file__, lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "timed steps (after the compiling one)")
_COMPARE = flags.DEFINE_multi_string("compare", [], "a variant to time side by side: "
                                     "comma-separated FIELD=VALUE overrides of the config")
_AGAINST = flags.DEFINE_enum("against", None, ["torch"], "also time the same-shape GPT-2 in "
                             "this framework, its steps alternating with bigflax's")


@dataclasses.dataclass
class Run:
  """One config's trainer, its step compiled once (the executable every timing calls), and the
  times of its steps."""
  name: str
  config: object
  trainer: Trainer
  step: object
  compile_seconds: float
  times: list[float] = dataclasses.field(default_factory=list)

  @classmethod
  def build(cls, name: str, config) -> "Run":
    trainer = Trainer(config)
    batch = trainer.batch(data.TRAIN, 0, config.batch_size)
    start = time.perf_counter()
    with trainer.run.activate():
      step = trainer.run.train_step.lower(trainer.state, batch, trainer.dropout_rng).compile()
    return cls(name, config, trainer, step, time.perf_counter() - start)

  def time_step(self, batch) -> None:
    """The step alone: inputs already on the device, synced at its end."""
    start = time.perf_counter()
    self.trainer.state, metrics = self.step(self.trainer.state, batch, self.trainer.dropout_rng)
    metrics["loss"].block_until_ready()
    self.times.append(time.perf_counter() - start)

  def loop_seconds_per_step(self, steps: int) -> float:
    """The training loop's way (Trainer.step with this executable): input pipeline, dispatch,
    no sync until the end. Beyond the step alone, that is the framework's overhead."""
    t, batch_size = self.trainer, self.config.batch_size
    start = time.perf_counter()
    for i in range(steps):
      t.state, metrics = self.step(t.state, t.batch(data.TRAIN, i, batch_size), t.dropout_rng)
    metrics["loss"].block_until_ready()
    return (time.perf_counter() - start) / steps


class TorchRun:
  """The config's shapes as transformers' GPT2LMHeadModel with torch.optim.AdamW, on the CPU's
  threads, and the times of its steps."""

  def __init__(self, config):
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    m, o = config.model, config.optimizer
    unlike = {"mlp": ("gelu", "gelu_tanh"), "norm": ("layernorm",), "positions": ("learned",)}
    for field, allowed in unlike.items():
      if m[field] not in allowed:
        raise ValueError(f"--against torch builds a GPT-2, which has no config.model.{field}="
                         f"{m[field]!r} (it has {' or '.join(allowed)})")
    if m.num_kv_heads not in (0, m.num_heads):
      raise ValueError("--against torch builds a GPT-2, which has no grouped-query attention "
                       f"(config.model.num_kv_heads={m.num_kv_heads})")
    self.torch, self.config, self.times = torch, config, []
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(config.seed)
    gpt2 = transformers.GPT2Config(
        n_layer=m.num_layers, n_head=m.num_heads, n_embd=m.embed_dim, n_positions=m.block_size,
        vocab_size=m.vocab_size, n_inner=m.mlp_dim or 4 * m.embed_dim,
        activation_function="gelu_new" if m.mlp == "gelu_tanh" else "gelu",
        resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=m.dropout,
        layer_norm_epsilon=m.norm_eps, tie_word_embeddings=m.tie_embeddings, use_cache=False,
        bos_token_id=None, eos_token_id=None)
    self.model = transformers.GPT2LMHeadModel(gpt2).train()
    self.attention = self.model.config._attn_implementation  # pylint: disable=protected-access
    exclude = tuple(o.weight_decay_exclude)
    def decayed(name, p):  # bigflax's leaf names: bias, scale (norms), embedding (wte, wpe)
      return not (p.ndim < 2 or ("embedding" in exclude and (".wte." in name or ".wpe." in name)))
    params = list(self.model.named_parameters())
    self.optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in params if decayed(n, p)], "weight_decay": o.weight_decay},
         {"params": [p for n, p in params if not decayed(n, p)], "weight_decay": 0.0}],
        lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps)
    self.autocast = m.dtype == "bfloat16"

  def batch(self, numpy_batch) -> tuple:
    return tuple(self.torch.from_numpy(numpy_batch[k].astype("int64"))
                 for k in ("inputs", "targets"))

  def time_step(self, batch) -> None:
    torch, (inputs, targets) = self.torch, batch
    k = self.config.grad_accum_steps
    start = time.perf_counter()
    self.optimizer.zero_grad(set_to_none=True)
    for micro_inputs, micro_targets in zip(inputs.chunk(k), targets.chunk(k)):
      with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
        logits = self.model(input_ids=micro_inputs).logits
      loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                               micro_targets.flatten())
      (loss / k).backward()
    if self.config.optimizer.clip_norm > 0:
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optimizer.clip_norm)
    self.optimizer.step()
    self.times.append(time.perf_counter() - start)


def variant(config, overrides: str):
  """config with "FIELD=VALUE,…" applied, each value read as its field's type."""
  config, changes = copy.deepcopy(config), {}
  for override in overrides.split(","):
    field, _, text = override.strip().partition("=")
    current = functools.reduce(lambda node, part: node[part], field.split("."), config)
    changes[field] = (text.lower() in ("1", "true") if isinstance(current, bool)
                      else type(current)(text))
  config.update_from_flattened_dict(changes)
  return config


def main(argv):
  del argv
  config = _CONFIG.value
  runs = [Run.build("base", config)] + [Run.build(o, variant(config, o)) for o in _COMPARE.value]
  base, m = runs[0], config.model
  against = None
  if _AGAINST.value == "torch":
    try:
      against = TorchRun(base.trainer.config)  # the resolved config: vocab_size filled in
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)
  tokens_per_step = config.batch_size * m.block_size
  # On a shared CPU the ceiling moves with the neighbours' load: it is measured before and after
  # the timed steps and the higher figure kept (the lower MFU).
  peak, source = hardware.peak_flops(DTYPES[m.dtype])
  batches = [[r.trainer.batch(data.TRAIN, i, config.batch_size) for r in runs]
             for i in range(_STEPS.value + 1)]
  torch_batches = [against.batch(base.trainer.local_batch(data.TRAIN, i, config.batch_size))
                   for i in range(_STEPS.value + 1)] if against else []
  for i, step_batches in enumerate(batches):  # the runs take turns, step by step
    if against:
      against.time_step(torch_batches[i])
    for run, batch in zip(runs, step_batches):
      run.time_step(batch)
  loop = base.loop_seconds_per_step(_STEPS.value)
  if hardware.chip_of(jax.devices()[0]) is None:
    peak = max(peak, hardware.measure_matmul_flops(DTYPES[m.dtype]))

  first, times = base.times[0], base.times[1:]  # the first run also warms caches and allocators
  median = statistics.median(times)
  cost = base.step.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  per_token = flops.train_flops_per_token(base.trainer.state.params, m)
  achieved = per_token * tokens_per_step / median
  print(f"config: {config.name or 'default'}; {m.num_layers} layers × {m.embed_dim} dims, "
        f"block {m.block_size}, batch {config.batch_size}, dtype {m.dtype}, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s)")
  print(f"step time: median {median * 1e3:.1f} ms (min {min(times) * 1e3:.1f}, max "
        f"{max(times) * 1e3:.1f}) over {len(times)} steps; compile {base.compile_seconds:.1f} s, "
        f"first step {first * 1e3:.1f} ms")
  print(f"training loop: {loop * 1e3:.1f} ms/step (mean of {_STEPS.value}, data pipeline and "
        f"dispatch included): {(loop - statistics.mean(times)) * 1e3:+.1f} ms over the step's "
        f"mean {statistics.mean(times) * 1e3:.1f} ms")
  print(f"tokens/s: {tokens_per_step / median:,.0f}")
  print(f"model FLOPs/token: {per_token / 1e6:.2f} M (6N + 12·L·T·d); XLA cost_analysis: "
        f"{cost['flops'] / tokens_per_step / 1e6:.2f} M/token (ratio "
        f"{cost['flops'] / tokens_per_step / per_token:.3f})")
  print(f"achieved: {achieved / 1e9:.1f} GFLOP/s; peak {peak / 1e9:.1f} GFLOP/s ({source})")
  if hardware.chip_of(jax.devices()[0]) is None:
    other = jnp.bfloat16 if m.dtype == "float32" else jnp.float32
    print(f"  (for reference, {jnp.dtype(other).name} ceiling: "
          f"{hardware.measure_matmul_flops(other) / 1e9:.1f} GFLOP/s)")
  print(f"MFU: {100 * achieved / peak:.1f}%")
  for run in runs[1:]:
    other = statistics.median(run.times[1:])
    print(f"side by side, {run.name}: median {other * 1e3:.1f} ms; base is "
          f"{other / median:.2f}× as fast")
  if against:
    theirs = statistics.median(against.times[1:])
    biases = "" if m.use_bias else "; with biases, which GPT-2 always has (bigflax: use_bias=False)"
    print(f"PyTorch {against.torch.__version__} (transformers GPT2LMHeadModel, "
          f"{against.attention} attention, AdamW, {against.torch.get_num_threads()} threads"
          f"{', bf16 autocast' if against.autocast else ''}{biases}): median "
          f"{theirs * 1e3:.1f} ms (min {min(against.times[1:]) * 1e3:.1f}, max "
          f"{max(against.times[1:]) * 1e3:.1f}) over {len(against.times) - 1} steps, "
          f"first step {against.times[0] * 1e3:.1f} ms")
    print(f"bigflax is {theirs / median:.2f}× the speed of PyTorch")


if __name__ == "__main__":
  app.run(main)
