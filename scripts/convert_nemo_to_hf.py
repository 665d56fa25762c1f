"""Export this project's model checkpoint (any TP/PP it was saved at) or a ``.nemo`` archive to a Hugging Face
folder that transformers and vLLM load (sharded safetensors + index, config, tokenizer, generation config).

    python scripts/convert_nemo_to_hf.py CHECKPOINT_DIR_OR_NEMO OUT_DIR [--dtype bf16]

A bad input stops with one line naming the file and exit code 2 (--debug: the traceback).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from wrpo_nemo.cli import add_debug_option, quiet_library_warnings, user_errors

DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def convert(source: Path, out: Path, *, dtype: str, overwrite: bool, max_shard_gb: float) -> Path:
    from wrpo_nemo.converters.hf_export import export_hf
    from wrpo_nemo.converters.nemo import nemo_to_hf

    kwargs = dict(dtype=DTYPES[dtype], overwrite=overwrite, max_shard_bytes=int(max_shard_gb * 1024**3))
    if source.is_file():
        return nemo_to_hf(source, out, **kwargs)
    return export_hf(source, out, **kwargs)


def main(argv: list[str] | None = None) -> None:
    quiet_library_warnings()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path, help="model checkpoint directory or .nemo file")
    parser.add_argument("out", type=Path, help="output Hugging Face folder")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="auto: as stored")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_debug_option(parser)
    args = parser.parse_args(argv)
    with user_errors(args.debug):
        out = convert(
            args.source, args.out, dtype=args.dtype, overwrite=args.overwrite, max_shard_gb=args.max_shard_gb
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
