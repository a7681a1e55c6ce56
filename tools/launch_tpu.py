"""Run bigflax on a Cloud TPU slice: create it, install this checkout on its workers, train, delete.

    python tools/launch_tpu.py create --name=NAME --zone=ZONE --accelerator=v5litepod-16 [--spot]
    python tools/launch_tpu.py setup  --name=NAME --zone=ZONE
    python tools/launch_tpu.py train  --name=NAME --zone=ZONE -- --config experiments/X.py ...
    python tools/launch_tpu.py ssh    --name=NAME --zone=ZONE -- 'any command'
    python tools/launch_tpu.py delete --name=NAME --zone=ZONE

Every command runs `gcloud compute tpus tpu-vm …`; add --dry-run to print the exact commands
instead. A multi-host slice runs one process per worker VM, all started at once with
`--worker=all`: each process finds the others through the VM's metadata
(`jax.distributed.initialize()`, called by `bigflax train` when it detects a TPU VM), loads only
its own rows of every batch, and process 0 writes the metrics. The workdir must be one shared
directory (a Filestore/NFS or gcsfuse mount): every worker writes its shards of the checkpoints.
"""

import argparse
import shlex
import subprocess
import sys

# Cloud TPU software versions by accelerator family (cloud.google.com/tpu/docs/runtimes).
RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite",
            "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
REMOTE_DIR = "bigflax"  # where `setup` puts this checkout, relative to each worker's home


def runtime_of(accelerator: str) -> str:
  family = accelerator.rsplit("-", 1)[0]
  if family not in RUNTIMES:
    raise SystemExit(f"unknown accelerator family {family!r} in --accelerator={accelerator}; "
                     f"known: {sorted(RUNTIMES)} (or pass --version)")
  return RUNTIMES[family]


def _tpu_vm(verb: str, args) -> list[str]:
  command = ["gcloud", "compute", "tpus", "tpu-vm", verb]
  return command + ([f"--project={args.project}"] if args.project else [])


def _on_all_workers(args, remote_command: str) -> list[str]:
  return _tpu_vm("ssh", args) + [args.name, f"--zone={args.zone}", "--worker=all",
                                 f"--command={remote_command}"]


def create(args) -> list[list[str]]:
  command = _tpu_vm("create", args) + [
      args.name, f"--zone={args.zone}", f"--accelerator-type={args.accelerator}",
      f"--version={args.version or runtime_of(args.accelerator)}"]
  return [command + (["--spot"] if args.spot else [])]


def setup(args) -> list[list[str]]:
  """This checkout (its code and experiments) onto every worker, installed with jax for TPU."""
  copy = _tpu_vm("scp", args) + ["--recurse", args.source, f"{args.name}:~/{REMOTE_DIR}",
                                 f"--zone={args.zone}", "--worker=all"]
  # The [tpu] extra brings the libtpu matching jax; constraints.txt holds CI's exact versions.
  install = (f'pip install -U pip && pip install -e "$HOME/{REMOTE_DIR}[tpu]" '
             f'-c "$HOME/{REMOTE_DIR}/constraints.txt"')
  return [copy, _on_all_workers(args, install)]


def train(args) -> list[list[str]]:
  bigflax = shlex.join(["python3", "-m", "bigflax", "train", *args.rest])
  return [_on_all_workers(args, f"cd ~/{REMOTE_DIR} && {bigflax}")]


def ssh(args) -> list[list[str]]:
  if not args.rest:
    raise SystemExit("ssh: give the command to run on every worker after --")
  return [_on_all_workers(args, " ".join(args.rest))]


def delete(args) -> list[list[str]]:
  return [_tpu_vm("delete", args) + [args.name, f"--zone={args.zone}", "--quiet"]]


COMMANDS = {"create": create, "setup": setup, "train": train, "ssh": ssh, "delete": delete}


def parse(argv: list[str]) -> argparse.Namespace:
  argv, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (
      argv, [])
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("command", choices=COMMANDS)
  parser.add_argument("--name", required=True, help="the TPU's name")
  parser.add_argument("--zone", required=True, help="e.g. us-west4-a (one that offers the type)")
  parser.add_argument("--project", default="", help="default: gcloud's configured project")
  parser.add_argument("--accelerator", default="", help="create: e.g. v5litepod-16, v4-32")
  parser.add_argument("--version", default="", help="create: TPU software version (default: "
                      "the one for the accelerator's family)")
  parser.add_argument("--spot", action="store_true", help="create: a Spot TPU (cheaper, "
                      "preemptible)")
  parser.add_argument("--source", default=".", help="setup: the checkout to copy")
  parser.add_argument("--dry-run", action="store_true", help="print the gcloud commands only")
  args = parser.parse_args(argv)
  if args.command == "create" and not args.accelerator:
    parser.error("create needs --accelerator (e.g. v5litepod-16)")
  args.rest = rest
  return args


def main(argv: list[str]) -> int:
  args = parse(argv)
  for command in COMMANDS[args.command](args):
    print(shlex.join(command), flush=True)
    if not args.dry_run:
      subprocess.run(command, check=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
