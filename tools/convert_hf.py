"""Convert between a Hugging Face `transformers` model directory and a bigflax run directory.

    python tools/convert_hf.py to_bigflax HF_DIR WORKDIR [--scan_layers] [--param_dtype bfloat16]
    python tools/convert_hf.py to_hf WORKDIR HF_DIR

to_bigflax reads config.json and *.safetensors (GPT-2 or Llama; no torch needed) and writes
WORKDIR/config.json (bigflax's base config with the imported `model` fields) and WORKDIR/params
(Orbax), the layout `bigflax sample` and fine-tuning (config.init_from) read. The tokenizer files
(tokenizer.json, tokenizer_config.json, …) are copied into WORKDIR/tokenizer/ and config.json's
data.tokenizer=hf reads them, so `bigflax sample --workdir WORKDIR` prints the model's own text.
to_hf reads a finished run (WORKDIR/config.json + params) and writes config.json and
model.safetensors that `transformers.AutoModelForCausalLM.from_pretrained(HF_DIR)` loads, and the
run's Hugging Face tokenizer files when it has them (data.tokenizer=hf).
Both write only into a new or empty directory, so nothing there is replaced or mixed with old
files; a conversion that fails removes what it wrote.
"""

import argparse
import pathlib
import shutil
import sys

from bigflax import interop, rundir
from bigflax.config import base, validate
from bigflax.data.tokenizers import HF_TOKENIZER_FILES, HFTokenizer
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
  source = pathlib.Path(args.source)
  tokenizer_files = [source / name for name in HF_TOKENIZER_FILES if (source / name).is_file()]
  has_tokenizer = (source / "tokenizer.json").is_file()
  if has_tokenizer:
    tokenizer_dir = target.absolute() / "tokenizer"
    config.data.tokenizer, config.data.tokenizer_model = "hf", str(tokenizer_dir)
    vocab = HFTokenizer(str(source)).vocab_size
    if vocab > fields["vocab_size"]:
      raise InteropError(f"the tokenizer in {source} has {vocab} ids but the model only "
                         f"{fields['vocab_size']}; they are not one model's files")
  validate(config)
  params = interop.to_layout(params, ModelConfig.from_config(config.model))

  def write():
    if has_tokenizer:
      tokenizer_dir.mkdir()
      for file in tokenizer_files:
        shutil.copy2(file, tokenizer_dir / file.name)
    rundir.write_config(config, target)
    rundir.export_params(target, params)
  write_new(target, write)
  if not has_tokenizer:
    return (f"wrote {args.target} (config.json, params/) from {args.source}; it holds no "
            "tokenizer.json, so the run has no tokenizer: copy the model's tokenizer files into "
            f"a directory and set data.tokenizer='hf', data.tokenizer_model=DIR in "
            f"{rundir.config_path(args.target)} before sampling")
  return f"wrote {args.target} (config.json, params/, tokenizer/) from {args.source}"


def to_hf(args) -> str:
  target = check_target(args.target)
  config, model, params, _ = rundir.load_export(args.source)
  family = interop.family_of(model.cfg)
  tokenizer_dir = pathlib.Path(config.data.tokenizer_model)
  tokenizer_files = [tokenizer_dir / name for name in HF_TOKENIZER_FILES
                     if config.data.tokenizer == "hf" and (tokenizer_dir / name).is_file()]

  def write():
    interop.save_hf(target, model.cfg, params)
    for file in tokenizer_files:
      shutil.copy2(file, target / file.name)
  write_new(target, write)
  tokenizer = ", tokenizer files" if tokenizer_files else ""
  return (f"wrote {args.target} ({family}: config.json, model.safetensors{tokenizer}) from "
          f"{args.source}")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=DESCRIPTION)
  commands = parser.add_subparsers(dest="command", required=True)
  hf_in = commands.add_parser(
      "to_bigflax", help="Convert a transformers directory into a bigflax run directory.",
      description="Reads config.json and *.safetensors of a GPT-2 or Llama model and writes a "
      "bigflax run directory (config.json, params/ and the tokenizer files in tokenizer/) that "
      "`bigflax sample` and fine-tuning (config.init_from) read.")
  hf_in.add_argument("source", help="The directory transformers' save_pretrained wrote.")
  hf_in.add_argument("target", help="The run directory to write; it must be new or empty.")
  hf_in.add_argument("--scan_layers", action="store_true",
                     help="Store the params stacked for a scanned model (model.scan_layers).")
  hf_in.add_argument("--param_dtype", default="float32", choices=["float32", "bfloat16"],
                     help="The dtype the params are stored in.")
  hf_out = commands.add_parser(
      "to_hf", help="Convert a finished bigflax run into a transformers directory.",
      description="Reads a finished run (config.json and params/) and writes config.json and "
      "model.safetensors that transformers' AutoModelForCausalLM.from_pretrained loads, with "
      "the run's Hugging Face tokenizer files when it has them.")
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
