"""The launchers in tools/: the exact gcloud command lines of the TPU launcher, and the SLURM batch
script run by a stand-in `srun` that starts its tasks on this machine with SLURM's variables."""

import os
import shlex
import stat
import subprocess
import sys

import numpy as np
import portpicker
import pytest

from bigflax.rundir import read_metrics
from conftest import REPO

TPU = ["--name=pod", "--zone=us-west4-a"]


def launch_tpu(*args):
  return subprocess.run([sys.executable, str(REPO / "tools" / "launch_tpu.py"), *args],
                        capture_output=True, text=True, timeout=60, cwd=REPO)


def commands(*args):
  result = launch_tpu("--dry-run", *args)  # before any `--`, after which all goes to the TPU
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines()]


def test_create_picks_the_runtime_of_the_accelerator():
  assert commands("create", *TPU, "--accelerator=v5litepod-16", "--project=lab") == [[
      "gcloud", "compute", "tpus", "tpu-vm", "create", "--project=lab", "pod",
      "--zone=us-west4-a", "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite"]]
  for accelerator, runtime in [("v4-32", "tpu-ubuntu2204-base"), ("v5p-8", "v2-alpha-tpuv5"),
                               ("v6e-16", "v2-alpha-tpuv6e")]:
    [command] = commands("create", *TPU, f"--accelerator={accelerator}", "--spot")
    assert command[-2:] == [f"--version={runtime}", "--spot"]
  [command] = commands("create", *TPU, "--accelerator=v5litepod-16", "--version=custom")
  assert command[-1] == "--version=custom"


def test_setup_copies_the_checkout_to_every_worker_and_installs_it():
  copy, install = commands("setup", *TPU)
  assert copy == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", ".", "pod:~/bigflax",
                  "--zone=us-west4-a", "--worker=all"]
  assert install[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod",
                         "--zone=us-west4-a", "--worker=all"]
  assert install[8] == ('--command=pip install -U pip && pip install -e "$HOME/bigflax[tpu]" '
                        '-c "$HOME/bigflax/constraints.txt"')


def test_train_runs_the_same_command_on_every_worker_with_its_arguments_intact():
  [command] = commands("train", *TPU, "--", "--config", "experiments/shakespeare_char.py",
                       "--config.mesh.fsdp=-1", "--config.sample.prompt=ROMEO: hi")
  assert command[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod",
                         "--zone=us-west4-a", "--worker=all"]
  remote = command[8].removeprefix("--command=")
  assert remote.startswith("cd ~/bigflax && ")
  assert shlex.split(remote.removeprefix("cd ~/bigflax && ")) == [
      "python3", "-m", "bigflax", "train", "--config", "experiments/shakespeare_char.py",
      "--config.mesh.fsdp=-1", "--config.sample.prompt=ROMEO: hi"]


def test_ssh_and_delete():
  [ssh] = commands("ssh", *TPU, "--", "pkill", "-f", "bigflax")
  assert ssh[-2:] == ["--worker=all", "--command=pkill -f bigflax"]
  assert commands("delete", *TPU) == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod",
                                       "--zone=us-west4-a", "--quiet"]]


@pytest.mark.parametrize("args, message", [
    (["create", *TPU], "create needs --accelerator"),
    (["create", *TPU, "--accelerator=v9-8"], "unknown accelerator family 'v9'"),
    (["ssh", *TPU], "give the command to run on every worker"),
    (["train", "--zone=z"], "the following arguments are required: --name"),
    (["launch", *TPU], "invalid choice: 'launch'"),
])
def test_bad_arguments_are_refused(args, message):
  result = launch_tpu("--dry-run", *args)
  assert result.returncode != 0 and message in result.stderr
  assert "Traceback" not in result.stderr


def test_without_dry_run_gcloud_is_really_called(tmp_path):
  fake = tmp_path / "gcloud"
  fake.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'calls'}\n")
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
  subprocess.run([sys.executable, str(REPO / "tools" / "launch_tpu.py"), "delete", *TPU],
                 env=env, check=True, capture_output=True, timeout=60)
  assert (tmp_path / "calls").read_text() == "compute tpus tpu-vm delete pod --zone=us-west4-a " \
                                             "--quiet\n"


# Stands in for `srun` on one machine: starts SLURM_NTASKS copies of the command with the variables
# SLURM gives each task, after dropping srun's own options.
FAKE_SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do echo "srun option $1" >&2; shift; done
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_STEP_NODELIST=127.0.0.1 "$@" > "$OUT/task$i.log" 2>&1 &
done
status=0
for task in $(jobs -p); do wait "$task" || status=1; done
exit $status
"""


@pytest.mark.slow
def test_the_batch_script_forms_one_run_from_slurm_variables(tmp_path, corpus_file):
  # jax derives the coordinator's port from the job id: choose an id whose port is free.
  job_id = next(j for j in range(1000, 1000 + 4096) if portpicker.is_port_free(61440 + j % 4096))
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text(FAKE_SRUN)
  (bin_dir / "srun").chmod(0o755)
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", OUT=str(tmp_path), SLURM_JOB_ID=str(job_id),
             SLURM_NTASKS="2", JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  args = [f"--config.data.path={corpus_file}", "--config.data.tokenizer=char", "--config.steps=1",
          "--config.log_every=1", "--config.eval_every=1", "--config.eval_batches=1",
          "--config.model.num_layers=1", "--config.model.block_size=16",
          "--config.model.embed_dim=32", "--config.sample.prompt=line",
          "--config.sample.max_new_tokens=4", "--config.optimizer.warmup_steps=0",
          "--config.mesh.data=-1",
          "--config.distributed.initialization_timeout=60", f"--workdir={tmp_path / 'run'}"]
  result = subprocess.run(["bash", str(REPO / "tools" / "slurm_train.sbatch"), *args], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=600)
  logs = [(tmp_path / f"task{i}.log").read_text() for i in range(2)]
  assert result.returncode == 0, result.stderr + "\n".join(log[-2000:] for log in logs)
  assert "srun option --kill-on-bad-exit=1" in result.stderr
  assert "mesh {'data': 8, 'fsdp': 1, 'tensor': 1} over 8 cpu devices" in logs[0]
  records = read_metrics(tmp_path / "run")
  assert [r["step"] for r in records] == [1, 1]
  assert np.isfinite([r.get("loss", r.get("eval_loss")) for r in records]).all()
