"""Build WRPO data as the paper does (WRPO.md, "Data construction"), one step per sub-command.

    python scripts/data/construct.py generate --model PATH --prompts prompts.jsonl --output-dir gen/ \
        --shard-index 0 --num-shards 8
    python scripts/data/construct.py score --reward-model RLHFlow/ArmoRM-Llama3-8B-v0.1 --trust-remote-code \
        --inputs gen/*/*.jsonl --output scored/shard0.jsonl
    python scripts/data/construct.py select --inputs scored/*.jsonl --target-model llama3-8b-sft --output wrpo.jsonl

Every step resumes: rerun the same command after a crash and it continues where it stopped. The options are
the fields of the step's config dataclass (``wrpo_nemo.data.construction``), with dashes for underscores.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from wrpo_nemo.cli import add_debug_option, quiet_library_warnings, user_errors
from wrpo_nemo.data.construction.generate import GenerateConfig, generate
from wrpo_nemo.data.construction.score import ScoreConfig, score
from wrpo_nemo.data.construction.select import SelectConfig, select

STEPS = {
    "generate": (GenerateConfig, generate),
    "score": (ScoreConfig, score),
    "select": (SelectConfig, select),
}


def _add_options(parser: argparse.ArgumentParser, config: type) -> None:
    hints = typing.get_type_hints(config)
    for f in dataclasses.fields(config):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if hint is bool:
            parser.add_argument(flag, action="store_true", default=default)
        elif typing.get_origin(hint) in (list, tuple):
            item = typing.get_args(hint)[0]
            parser.add_argument(flag, nargs="+", type=item, default=default)
        elif hint in (int, float):
            parser.add_argument(flag, type=hint, default=default)
        else:
            parser.add_argument(flag, default=default)


def main(argv: list[str] | None = None) -> str:
    quiet_library_warnings()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    steps = parser.add_subparsers(dest="step", required=True)
    for name, (config, _) in STEPS.items():
        step = steps.add_parser(name, help=config.__doc__)
        _add_options(step, config)
        add_debug_option(step)
    args = vars(parser.parse_args(argv))
    config, run = STEPS[args.pop("step")]
    debug = args.pop("debug")
    hints = typing.get_type_hints(config)
    values = {k: tuple(v) if typing.get_origin(hints[k]) is tuple else v for k, v in args.items()}
    with user_errors(debug):
        path = run(config(**values))
    print(path)
    return path


if __name__ == "__main__":
    main()
