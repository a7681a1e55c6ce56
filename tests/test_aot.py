"""AOT compilation for TPU topologies from this CPU. Needs libtpu (in the `test` extra)."""

import math
import re

import flax.linen as nn
import numpy as np
import pytest

from bigflax import aot, flops, sharding
from bigflax.config import base
from bigflax.errors import UserError
from bigflax.model import ModelConfig, Transformer, abstract_params


@pytest.mark.parametrize("name, topology", [
    ("v5e-4", "v5e:2x2"), ("v5e-16", "v5e:4x4"), ("v5e-256", "v5e:16x16"), ("v6e-8", "v6e:2x4"),
    ("v5p-8", "v5p:2x2x1"), ("v5p-64", "v5p:2x4x4"), ("v5p-128", "v5p:4x4x4"),
    ("v4-32", "v4:2x2x4"), ("v5p:4x4x8", "v5p:4x4x8"),
])
def test_slice_names_map_to_topologies(name, topology):
  assert aot.topology_name(name) == topology


@pytest.mark.parametrize("name", ["v5e-12", "v7-8", "tpu", "v5p-3"])
def test_bad_topology_names_are_refused(name):
  with pytest.raises(UserError, match="not a TPU topology"):
    aot.topology_name(name)


def small_config():
  c = base()
  c.model.vocab_size = 256
  c.batch_size = 16
  return c


def analytic_step_flops(c):
  m = c.model
  params = nn.unbox(abstract_params(Transformer(ModelConfig.from_config(m)), m.block_size))
  per_token = flops.train_flops_per_token(params, m)
  param_bytes = sum(x.size * 4 for x in __import__("jax").tree.leaves(params))
  return per_token * c.batch_size * m.block_size, param_bytes


def test_compile_for_v5e_2x2_reports_memory_flops_and_collectives():
  pytest.importorskip("libtpu", reason="libtpu is not installed, so nothing can be compiled for "
                      "TPU here: pip install -e '.[test]' installs it")
  c = small_config()
  c.model.attention = "xla"  # XLA's cost analysis cannot count inside a Pallas kernel (flash)
  plan = aot.compile_plan(c, "v5e:2x2")
  expected_flops, param_bytes = analytic_step_flops(c)
  assert plan.device_kind == "TPU v5 lite" and plan.mesh["data"] == 4
  # XLA also counts norms, softmax and the optimizer: a few percent above the matmul count.
  assert 1.0 <= plan.flops_per_device * 4 / expected_flops < 1.1
  np.testing.assert_allclose(plan.model_flops_per_device * 4, expected_flops, rtol=1e-9)
  # Data parallel: each device holds all params plus Adam's two moments.
  assert plan.argument_bytes >= 3 * param_bytes
  assert plan.fits and plan.hbm_bytes == 16 * 2**30
  assert plan.collectives.get("all-reduce", 0) >= 1  # gradients are summed across replicas
  # The five largest temporaries, largest first, each within the temporary memory.
  sizes = [b.bytes for b in plan.largest_temps]
  assert len(sizes) == 5 and sizes == sorted(sizes, reverse=True)
  assert 0 < sizes[-1] and sizes[0] <= plan.temp_bytes
  for buffer in plan.largest_temps:
    assert re.fullmatch(r"(pred|s32|u32|u8|bf16|f32)\[[\d,]*\]", buffer.shape), buffer
    dims = [int(d) for d in buffer.shape.split("[")[1][:-1].split(",") if d]
    assert buffer.bytes >= math.prod(dims)  # padded to the TPU's tiles, never smaller
  report = aot.describe(plan)
  assert "FITS" in report and "largest temporaries (5):" in report
  assert all(b.instruction in report and b.shape in report for b in plan.largest_temps)


# A buffer assignment as XLA dumps it for a TPU: only the default memory space's temporary
# allocation counts; a tuple value is its pointer table; one offset and size is one buffer.
BUFFER_ASSIGNMENT = """\
allocation 0: size 4096, parameter 0, shape |f32[1024]| at ShapeIndex {}:
 value: <1 param.0 @0> (size=4096,offset=0): f32[1024]{0}
allocation 1: size 9000, preallocated-temp:
 value: <2 fusion.1 @0> (size=512,offset=0): (f32[4,32]{1,0:T(4,128)}, f32[4,32]{1,0})
 value: <3 fusion.2 @0> (size=2048,offset=512): bf16[4,256]{1,0:T(8,128)(2,1)}
 value: <4 copy.3 @0> (size=2048,offset=512): bf16[4,256]{1,0:T(8,128)(2,1)}
 value: <5 fusion.4{} @0> (size=6144,offset=2560): f32[3,512]{1,0:T(8,128)}
 value: <6 dot.5 @0> (size=256,offset=8704): s32[64]{0}
allocation 2: size 99999, color 1, preallocated-temp:
 value: <7 fusion.6 @1> (size=99999,offset=0): f32[24999]{0:S(1)}
"""
HLO = """\
  %fusion.2 = bf16[4,256]{1,0} fusion(%p), kind=kLoop, metadata={op_name="jit(f)/attn/dot_general"}
  %copy.3 = bf16[4,256]{1,0} copy(%fusion.2)
  ROOT %fusion.4 = f32[3,512]{1,0} fusion(%p), kind=kLoop, metadata={op_name="jit(f)/mlp/mul" x=1}
"""


def test_largest_temporaries_read_from_the_buffer_assignment():
  buffers = aot.largest_temporaries(BUFFER_ASSIGNMENT, HLO, count=2)
  assert buffers == [aot.TempBuffer(6144, "f32[3,512]", "fusion.4", "jit(f)/mlp/mul"),
                     aot.TempBuffer(2048, "bf16[4,256]", "fusion.2", "jit(f)/attn/dot_general")]
  assert [b.instruction for b in aot.largest_temporaries(BUFFER_ASSIGNMENT, HLO)] == [
      "fusion.4", "fusion.2", "dot.5"]


@pytest.mark.slow
def test_a_model_that_does_not_fit_gets_settings_that_do(monkeypatch):
  pytest.importorskip("libtpu", reason="libtpu is not installed, so nothing can be compiled for "
                      "TPU here: pip install -e '.[test]' installs it")
  c = small_config()
  # ~1.6B parameters: with Adam, 19 GiB per v5e chip (16 GiB) when replicated, a quarter with FSDP.
  c.model.num_layers, c.model.embed_dim, c.model.num_heads = 2, 8192, 64
  c.model.block_size, c.batch_size = 32, 4
  monkeypatch.setattr(aot, "alternatives", lambda config: [{"mesh.data": 1, "mesh.fsdp": -1}])
  lines = []
  plan = aot.plan_and_report(c, "v5e-4", print_fn=lines.append)
  assert not plan.fits and "DOES NOT FIT" in "\n".join(lines)
  assert lines[-1].strip().startswith("fits") and "--config.mesh.fsdp=-1" in lines[-1]


@pytest.mark.slow
def test_a_chunked_loss_keeps_whole_rows_of_logits_out_of_the_compiled_step():
  """config.loss_chunk: the f32 logits [rows, length, vocab], the step's largest temporary when
  the loss takes them whole, are gone from the compiled step's buffers, and the total drops."""
  pytest.importorskip("libtpu", reason="libtpu is not installed, so nothing can be compiled for "
                      "TPU here: pip install -e '.[test]' installs it")
  c = small_config()
  c.model.vocab_size, c.model.block_size, c.batch_size = 8192, 1024, 8
  c.model.update(num_layers=1, embed_dim=64, num_heads=2, scan_layers=True, remat="full")
  logits = "f32[2,1024,8192]"  # 2 rows on each of 4 chips
  whole = aot.compile_plan(c, "v5e:2x2", {"loss_chunk": 0})
  chunked = aot.compile_plan(c, "v5e:2x2", {"loss_chunk": 256})
  assert whole.largest_temps[0].shape == logits
  assert logits not in {b.shape for b in chunked.largest_temps}
  assert chunked.temp_bytes < 0.5 * whole.temp_bytes


def test_a_batch_that_does_not_split_over_the_chips_names_the_field():
  pytest.importorskip("libtpu", reason="libtpu is not installed, so nothing can be compiled for "
                      "TPU here: pip install -e '.[test]' installs it")
  c = small_config()
  c.batch_size = 6  # 4 chips of data parallelism
  with pytest.raises(sharding.ShardingError, match=r"config.batch_size=6 must split into .* "
                                                   r"divisible by config.mesh.data × "
                                                   r"config.mesh.fsdp = 4"):
    aot.compile_plan(c, "v5e:2x2")


def test_alternatives_try_fsdp_then_smaller_microbatches():
  c = small_config()
  options = aot.alternatives(c)
  assert options[0] == {"mesh.data": 1, "mesh.fsdp": -1}
  accum = [o["grad_accum_steps"] for o in options if "grad_accum_steps" in o]
  assert accum == [2, 4, 8]
