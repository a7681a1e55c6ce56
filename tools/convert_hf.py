"""Convert between a Hugging Face `transformers` model directory and a bigflax run directory.

    python tools/convert_hf.py to_bigflax HF_DIR WORKDIR [--scan_layers] [--param_dtype bfloat16]
    python tools/convert_hf.py to_hf WORKDIR HF_DIR

to_bigflax reads config.json and *.safetensors (GPT-2 or Llama; no torch needed) and writes
WORKDIR/config.json (bigflax's base config with the imported `model` fields) and WORKDIR/params
(Orbax), the layout `bigflax sample` and fine-tuning read. The checkpoint's tokenizer is not
converted: give the run a matching tokenizer before sampling text from it.
to_hf reads a finished run (WORKDIR/config.json + params) and writes config.json and
model.safetensors that `transformers.AutoModelForCausalLM.from_pretrained(HF_DIR)` loads.
Both write only into a new or empty directory, so nothing there is replaced or mixed with old
files; a conversion that fails removes what it wrote.
"""

import argparse
import pathlib
import shutil
import sys

from bigflax import interop, rundir
from bigflax.config import base, validate
from bigflax.errors import InteropError, UserError
from bigflax.model import ModelConfig

DESCRIPTION = (
    "Converts a Hugging Face transformers model directory (GPT-2 or Llama) into a bigflax run "
    "directory, or a finished bigflax run into a transformers directory. Each conversion writes "
    "into a new or empty directory only, so nothing already there is replaced.")


def check_target(target: str) -> pathlib.Path:
  """The target directory, refused (InteropError) unless it is absent or empty."""
  path = pathlib.Path(target)
  if path.exists() and not path.is_dir():
    raise InteropError(f"{target} is a file; give a new or empty directory to write into")
  held = sorted(child.name for child in path.iterdir()) if path.is_dir() else []
  if held:
    listed = ", ".join(held[:4]) + (", …" if len(held) > 4 else "")
    raise InteropError(f"{target} is not empty (it holds {listed}); converting into it would "
                       "replace or mix with those files: give a new or empty directory")
  return path


def write_new(target: pathlib.Path, write) -> None:
  """Runs write(); if it fails, removes what it wrote (the target was absent or empty)."""
  existed = target.exists()
  target.mkdir(parents=True, exist_ok=True)
  try:
    write()
  except BaseException:
    for child in target.iterdir():
      if child.is_dir() and not child.is_symlink():
        shutil.rmtree(child)
      else:
        child.unlink()
    if not existed:
      target.rmdir()
    raise


def to_bigflax(args) -> str:
  target = check_target(args.target)
  fields, params = interop.load_hf(args.source, param_dtype=args.param_dtype)
  config = base()
  config.name = f"hf_{fields['num_layers']}l_{fields['embed_dim']}d"
  config.model.update(fields, scan_layers=args.scan_layers)
  validate(config)
  params = interop.to_layout(params, ModelConfig.from_config(config.model))

  def write():
    rundir.write_config(config, target)
    rundir.export_params(target, params)
  write_new(target, write)
  return f"wrote {args.target} (config.json, params/) from {args.source}"


def to_hf(args) -> str:
  target = check_target(args.target)
  _, model, params, _ = rundir.load_export(args.source)
  family = interop.family_of(model.cfg)
  write_new(target, lambda: interop.save_hf(target, model.cfg, params))
  return f"wrote {args.target} ({family}: config.json, model.safetensors) from {args.source}"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=DESCRIPTION)
  commands = parser.add_subparsers(dest="command", required=True)
  hf_in = commands.add_parser(
      "to_bigflax", help="Convert a transformers directory into a bigflax run directory.",
      description="Reads config.json and *.safetensors of a GPT-2 or Llama model and writes a "
      "bigflax run directory (config.json and params/) that `bigflax sample` and fine-tuning "
      "read. The tokenizer is not converted.")
  hf_in.add_argument("source", help="The directory transformers' save_pretrained wrote.")
  hf_in.add_argument("target", help="The run directory to write; it must be new or empty.")
  hf_in.add_argument("--scan_layers", action="store_true",
                     help="Store the params stacked for a scanned model (model.scan_layers).")
  hf_in.add_argument("--param_dtype", default="float32", choices=["float32", "bfloat16"],
                     help="The dtype the params are stored in.")
  hf_out = commands.add_parser(
      "to_hf", help="Convert a finished bigflax run into a transformers directory.",
      description="Reads a finished run (config.json and params/) and writes config.json and "
      "model.safetensors that transformers' AutoModelForCausalLM.from_pretrained loads.")
  hf_out.add_argument("source", help="The run directory of a finished run.")
  hf_out.add_argument("target", help="The transformers directory to write; it must be new or "
                      "empty.")
  args = parser.parse_args(argv)
  try:
    print({"to_bigflax": to_bigflax, "to_hf": to_hf}[args.command](args))
  except UserError as e:  # bad input: one line, no traceback
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(1) from None


if __name__ == "__main__":
  main()
