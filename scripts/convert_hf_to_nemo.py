"""Convert a Hugging Face Llama/Mistral/Qwen2 folder into this project's model checkpoint or a ``.nemo`` archive.

    python scripts/convert_hf_to_nemo.py HF_DIR OUT_DIR            # model checkpoint (loads at any TP/PP)
    python scripts/convert_hf_to_nemo.py HF_DIR model.nemo         # NeMo archive

Streams tensor by tensor (peak memory about one layer). Refuses an existing output unless --overwrite.
A bad input stops with one line naming the file and exit code 2 (--debug: the traceback).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from wrpo_nemo.cli import add_debug_option, quiet_library_warnings, user_errors

DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def convert(hf_dir: Path, out: Path, *, dtype: str, overwrite: bool, vocab_multiple: int | None) -> Path:
    from wrpo_nemo.checkpoint.atomic import check_output
    from wrpo_nemo.converters.hf_import import import_hf
    from wrpo_nemo.converters.nemo import write_nemo

    kwargs = dict(dtype=DTYPES[dtype], make_vocab_size_divisible_by=vocab_multiple)
    if out.suffix != ".nemo":
        import_hf(hf_dir, out, overwrite=overwrite, **kwargs)
        return out
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".convert-") as tmp:
        import_hf(hf_dir, Path(tmp) / "checkpoint", **kwargs)
        return write_nemo(Path(tmp) / "checkpoint", out, overwrite=overwrite)


def main(argv: list[str] | None = None) -> None:
    quiet_library_warnings()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("hf_dir", type=Path, help="Hugging Face folder (config.json + *.safetensors)")
    parser.add_argument("out", type=Path, help="output checkpoint directory, or a path ending in .nemo")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="auto", help="stored dtype (auto: as in HF)"
    )
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=None, dest="vocab_multiple")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_debug_option(parser)
    args = parser.parse_args(argv)
    with user_errors(args.debug):
        out = convert(
            args.hf_dir,
            args.out,
            dtype=args.dtype,
            overwrite=args.overwrite,
            vocab_multiple=args.vocab_multiple,
        )
    print(f"wrote {out}")


if __name__ == "__main__":  # import-safe: megatron's checkpoint writer spawns helper processes
    main()
