"""Multi-host rehearsal on one machine: `bigflax train` as 2 processes of 4 CPU devices each on
127.0.0.1 must train exactly like 1 process of 8 devices, and fail fast and clearly when a process
is missing, dies, or disagrees about the process count."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest

from bigflax import distributed
from bigflax.config import ConfigError, validate
from bigflax.rundir import read_metrics
from conftest import REPO, bigflax_env, tiny_config

TIMEOUT = 15  # seconds: config.distributed.initialization_timeout here
HEARTBEAT = 8  # seconds: config.distributed.heartbeat_timeout here


def run_args(corpus_file, workdir, steps=5, extra=()):
  c = tiny_config(corpus_file)
  return ["train", f"--config.data.path={corpus_file}", "--config.data.tokenizer=char",
          f"--config.steps={steps}", "--config.log_every=1", f"--config.eval_every={steps}",
          "--config.eval_batches=1", f"--config.batch_size={c.batch_size}",
          f"--config.model.block_size={c.model.block_size}",
          f"--config.model.num_layers={c.model.num_layers}",
          f"--config.model.num_heads={c.model.num_heads}",
          f"--config.model.embed_dim={c.model.embed_dim}", "--config.sample.prompt=line",
          "--config.sample.max_new_tokens=4", "--config.optimizer.warmup_steps=1",
          "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
          f"--config.distributed.initialization_timeout={TIMEOUT}",
          f"--config.distributed.heartbeat_timeout={HEARTBEAT}", f"--workdir={workdir}", *extra]


def start(args, devices, cwd=REPO):
  """`bigflax ARGS` with its own device count: the child must not inherit the tests' 8."""
  return subprocess.Popen([sys.executable, "-m", "bigflax", *args], cwd=cwd, env=bigflax_env(devices),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process, timeout=300):
  out, err = process.communicate(timeout=timeout)
  return process.returncode, out, err


def process_args(address, num_processes, process_id):
  return [f"--config.distributed.coordinator_address={address}",
          f"--config.distributed.num_processes={num_processes}",
          f"--config.distributed.process_id={process_id}"]


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_all_devices(tmp_path, corpus_file):
  address = f"127.0.0.1:{portpicker.pick_unused_port()}"
  more = tmp_path / "more.jsonl"  # a second eval set: every set's numbers must agree
  more.write_text("".join(f'{{"text": "line {i}: the lazy dog {i}"}}\n' for i in range(40)))
  sets = f"--config.eval.sets=val;more=jsonl:{more}"
  # One workdir for both, as on a shared filesystem: Orbax writes the params from every process.
  workers = [start(run_args(corpus_file, tmp_path / "two",
                            extra=(sets, *process_args(address, 2, i))), devices=4)
             for i in range(2)]
  single = start(run_args(corpus_file, tmp_path / "single", extra=(sets,)), devices=8)
  results = [finish(p) for p in workers]
  for code, _, err in results:
    assert code == 0, err[-3000:]
  code, single_out, err = finish(single)
  assert code == 0, err[-3000:]

  two, one = read_metrics(tmp_path / "two"), read_metrics(tmp_path / "single")
  assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3, 4, 5, 5]
  for a, b in zip(two, one):
    keys = ["loss"] if "loss" in a else [k for k in b if k.startswith("eval")]
    assert len(keys) in (1, 10) and keys == [k for k in a if k in keys]
    # rtol too: perplexity is exp(loss), so a loss summed in another order (1e-7 apart, a few
    # f32 ulps) differs by ~4e-5 at a perplexity near 92.
    np.testing.assert_allclose([a[k] for k in keys], [b[k] for k in keys], rtol=1e-6, atol=1e-5)
  assert "over 8 cpu devices" in results[0][1] and "over 8 cpu devices" in single_out
  # Only process 0 writes metrics (no record twice), TensorBoard events and talks to the user.
  assert len(list((tmp_path / "two").glob("events.out.tfevents*"))) == 1
  assert "sample (" in results[0][1] and "step 5: eval_loss" in results[0][1]
  # Process 1 prints nothing of ours. (Gloo's C++ connection logging also goes to its stdout,
  # from several threads at once, so its lines interleave: look for our words, not for silence.)
  for ours in ("loss", "sample (", "cpu devices", "step "):
    assert ours not in results[1][1], results[1][1]

  # `bigflax eval` of the last checkpoint on 2 processes, another mesh: the training eval's numbers
  address = f"127.0.0.1:{portpicker.pick_unused_port()}"
  evals = [start(["eval", f"--workdir={tmp_path / 'two'}", "--step=5", "--config.mesh.data=4",
                  "--config.mesh.fsdp=1", *process_args(address, 2, i)], devices=4)
           for i in range(2)]
  results = [finish(p) for p in evals]
  for code, _, err in results:
    assert code == 0, err[-3000:]
  written = json.loads((tmp_path / "two" / "eval_5.json").read_text())["sets"]
  for name, prefix in (("val", "eval_"), ("more", "eval/more/")):
    for metric in ("loss", "accuracy", "bpb", "documents"):
      np.testing.assert_allclose(written[name][metric], one[-1][prefix + metric], rtol=1e-5)
  assert "wrote" in results[0][1] and "wrote" not in results[1][1]


@pytest.mark.slow
def test_a_missing_process_is_reported_within_the_timeout(tmp_path, corpus_file):
  """Process 0 alone waits for its peer; process 1 alone waits for a coordinator."""
  began = time.monotonic()
  alone = {i: start(run_args(corpus_file, tmp_path / str(i), extra=process_args(
      f"127.0.0.1:{portpicker.pick_unused_port()}", 2, i)), devices=4) for i in range(2)}
  (code0, _, err0), (code1, _, err1) = finish(alone[0]), finish(alone[1])
  assert time.monotonic() - began < TIMEOUT + 90  # startup on a loaded 2-core machine included
  # XLA aborts process 0 with its own message, after ours naming the setting.
  assert code0 != 0 and "DEADLINE_EXCEEDED" in err0
  assert f"config.distributed.initialization_timeout={TIMEOUT} s for every process" in err0
  assert code1 == 1 and "Traceback" not in err1
  assert ("error: nothing answers at config.distributed.coordinator_address=127.0.0.1:"
          in err1) and f"after config.distributed.initialization_timeout={TIMEOUT} s" in err1


@pytest.mark.slow
def test_a_process_that_dies_stops_the_other(tmp_path, corpus_file):
  address = f"127.0.0.1:{portpicker.pick_unused_port()}"
  args = [run_args(corpus_file, tmp_path, steps=100000, extra=process_args(address, 2, i))
          for i in range(2)]
  survivor, victim = start(args[0], devices=4), start(args[1], devices=4)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.monotonic() + 240
  while not (metrics.exists() and metrics.read_text().count("\n") >= 3):  # training is under way
    assert time.monotonic() < deadline and survivor.poll() is None, survivor.stderr.read()
    time.sleep(0.5)
  victim.send_signal(signal.SIGKILL)
  killed = time.monotonic()
  code, _, err = finish(survivor, timeout=HEARTBEAT + 60)
  assert code != 0 and time.monotonic() - killed < HEARTBEAT + 30
  reason = next(line for line in err.splitlines() if "Terminating process" in line)
  assert "another task died" in reason
  print(f"survivor exited {time.monotonic() - killed:.1f} s after the kill: {reason}")
  victim.communicate()


@pytest.mark.slow
def test_a_process_count_the_coordinator_does_not_share_names_the_field(tmp_path, corpus_file):
  address = f"127.0.0.1:{portpicker.pick_unused_port()}"
  coordinator = start(run_args(corpus_file, tmp_path / "p0", extra=process_args(address, 2, 0)),
                      devices=4)
  confused = start(run_args(corpus_file, tmp_path / "p1", extra=process_args(address, 3, 1)),
                   devices=4)
  results = [finish(p) for p in (coordinator, confused)]
  assert all(code != 0 for code, _, _ in results)
  assert ("error: config.distributed.num_processes=3 but the coordinator formed a run of 2 "
          "processes" in results[1][2])


@pytest.mark.slow
def test_a_workdir_the_hosts_do_not_share_is_refused(tmp_path, corpus_file):
  address = f"127.0.0.1:{portpicker.pick_unused_port()}"
  processes = [start(run_args(corpus_file, tmp_path / f"host{i}",
                              extra=process_args(address, 2, i)), devices=4) for i in range(2)]
  (code0, _, _), (code1, _, err1) = (finish(p) for p in processes)
  assert code0 != 0 and code1 == 1 and "Traceback" not in err1
  assert (f"error: --workdir {tmp_path / 'host1'} is not one directory shared by all hosts: "
          "process 1 does not see what process 0 wrote there") in err1


@pytest.mark.parametrize("environ, pci_vendor, expected", [
    ({}, None, None),
    ({}, "0x8086", None),
    ({}, distributed.GOOGLE_PCI_VENDOR, "cloud_tpu"),  # a Cloud TPU VM
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, None, "cloud_tpu"),  # a GKE TPU pod
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None, None),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_NTASKS": "16"}, None,
     "slurm"),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "gpu01", "SLURM_NTASKS": "1"}, None, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, None, None),  # sbatch's shell, not srun
])
def test_clusters_are_detected_from_their_environment(tmp_path, environ, pci_vendor, expected):
  if pci_vendor:
    (tmp_path / "0000:00:04.0").mkdir()
    (tmp_path / "0000:00:04.0" / "vendor").write_text(pci_vendor + "\n")
  assert distributed.detect_cluster(environ, tmp_path) == expected


def test_a_half_configured_coordinator_is_refused(corpus_file):
  config = tiny_config(corpus_file, **{"distributed.coordinator_address": "127.0.0.1:1234"})
  with pytest.raises(ConfigError, match=r"config.distributed.coordinator_address='127.0.0.1:1234' "
                     r"needs config.distributed.num_processes > 0"):
    validate(config)
  config.distributed.update(num_processes=2, process_id=2)
  with pytest.raises(ConfigError, match="got num_processes=2, process_id=2"):
    validate(config)
