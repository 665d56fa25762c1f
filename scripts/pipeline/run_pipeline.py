"""The paper's pipeline end to end, as restartable steps (WRPO.md, "Two-stage pipeline" and "Data construction").

    import   HF base model (LLaMA-3-8B-Instruct) -> megatron checkpoint          scripts/convert_hf_to_nemo.py
    sft      stage 1: SFT on y_ws of the SFT third of the prompts               recipes/wrpo.py stages=[sft]
    prompts  the WRPO (and held-out) prompts, and their source responses y_ws    (this script)
    generate target responses: samples of the SFT model per prompt and seed     scripts/data/construct.py generate
    score    reward-model scores of target and source responses                  scripts/data/construct.py score
    select   y_ws = best source, y_wt / y_l = best / worst target sample         scripts/data/construct.py select
    wrpo     stage 2: WRPO from the SFT checkpoint on the selected records       recipes/wrpo.py stages=[wrpo]
    export   the final WRPO checkpoint -> Hugging Face folder                    scripts/convert_nemo_to_hf.py
    eval     MT-Bench / AlpacaEval 2 / Arena-Hard-Auto answers                   scripts/eval/generate_answers.py

    python scripts/pipeline/run_pipeline.py --work-dir runs/paper --base-model /models/Meta-Llama-3-8B-Instruct \
        --records ultrafeedback_wrpo.jsonl --reward-model /models/ArmoRM-Llama3-8B-v0.1 --trust-remote-code \
        --launcher "torchrun --nproc-per-node 8" --mt-bench question.jsonl --alpaca-eval alpaca_eval.json

A step whose marker ``<work-dir>/done/<step>`` exists is skipped; a step that stopped half way is rerun and
continues where it stopped (the recipe resumes from its last checkpoint, generation and scoring from their
output files). ``--dry-run`` prints the commands of the steps still to do; ``--shards 8`` samples and scores
with eight processes side by side, one per GPU of the node. The records give the prompts and
the source responses (y_ws, e.g. the released AALF/ultrafeedback_wrpo data); the target responses are sampled
anew from the SFT model.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEPS = ("import", "sft", "prompts", "generate", "score", "select", "wrpo", "export", "eval")
SHARDED = ("generate", "score")
"""Steps that run ``--shards`` processes side by side, one per GPU."""
TARGET_NAME = "target-sft"
"""The model name of the SFT model's samples: selection tells target from source responses by it."""


class Pipeline:
    """The paths of one pipeline run and the commands of its steps."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(args.work_dir).resolve()
        self.imported = self.work / "import" / "base"
        self.sft_dir, self.wrpo_dir = self.work / "sft", self.work / "wrpo"
        self.sft_hf = self.sft_dir / "sft" / "hf"
        self.data = self.work / "data"
        self.prompts, self.sources = self.data / "prompts.jsonl", self.data / "source_responses.jsonl"
        self.generated, self.scored = self.data / "generated", self.data / "scored"
        self.selected = self.data / "wrpo.jsonl"
        self.exported = self.work / "export" / "hf"

    def recipe(self, config: str, run_dir: Path, stage: str, *overrides: str) -> list[str]:
        """The recipe under the launcher, resuming whatever an earlier attempt left."""
        common = [f"run_dir={run_dir}", f"stages=[{stage}]", f"model.hf_path={self.args.base_model}",
                  "checkpoint.resume=true", *self.args.override]  # fmt: skip
        return [*shlex.split(self.args.launcher), str(ROOT / "recipes" / "wrpo.py"), "--config-name", config,
                *common, *overrides]  # fmt: skip

    def latest(self, run_dir: Path, stage: str) -> str:
        """The newest checkpoint of a finished stage (a placeholder in a dry run, before it exists)."""
        from wrpo_nemo.training.checkpoint import latest_checkpoint

        found = latest_checkpoint(run_dir / stage)
        return str(found) if found else f"<latest checkpoint in {run_dir / stage / 'checkpoints'}>"

    def commands(self, step: str) -> list[list[str]]:
        """The commands of ``step`` (``prompts`` runs in this process and has none)."""
        a, py = self.args, sys.executable
        construct = [py, str(ROOT / "scripts" / "data" / "construct.py")]
        if step == "import":
            return [[py, str(ROOT / "scripts" / "convert_hf_to_nemo.py"), a.base_model, str(self.imported),
                     "--overwrite"]]  # fmt: skip
        if step == "sft":
            return [self.recipe(a.sft_config, self.sft_dir, "sft", f"model.checkpoint={self.imported}",
                                f"data.source.sources=[{a.records}]", "export.hf=true",
                                *a.sft_override)]  # fmt: skip
        n = a.shards
        if step == "generate":
            return [[*construct, "generate", "--model", str(self.sft_hf), "--model-name", TARGET_NAME,
                     "--prompts", str(self.prompts), "--output-dir", str(self.generated),
                     "--seeds", *map(str, a.seeds), "--temperature", str(a.temperature), "--top-p", str(a.top_p),
                     "--max-new-tokens", str(a.max_new_tokens), "--backend", a.backend,
                     "--shard-index", str(i), "--num-shards", str(n)] for i in range(n)]  # fmt: skip
        if step == "score":
            pattern = str(self.generated / TARGET_NAME / "*.jsonl")
            inputs = sorted(glob.glob(pattern)) or [pattern]
            flags = ["--trust-remote-code"] if a.trust_remote_code else []
            return [[*construct, "score", "--reward-model", a.reward_model, *flags, "--inputs", *inputs,
                     str(self.sources), "--output", str(self.scored / f"shard-{i:05d}-of-{n:05d}.jsonl"),
                     "--shard-index", str(i), "--num-shards", str(n)] for i in range(n)]  # fmt: skip
        if step == "select":
            pattern = str(self.scored / "*.jsonl")
            return [[*construct, "select", "--inputs", *(sorted(glob.glob(pattern)) or [pattern]),
                     "--target-model", TARGET_NAME, "--output", str(self.selected)]]  # fmt: skip
        if step == "wrpo":
            return [self.recipe(a.wrpo_config, self.wrpo_dir, "wrpo", f"model.checkpoint={self.latest(self.sft_dir, 'sft')}",
                                f"data.source.sources=[{self.selected}]", "export.hf=false",
                                *a.wrpo_override)]  # fmt: skip
        if step == "export":
            return [[py, str(ROOT / "scripts" / "convert_nemo_to_hf.py"), self.latest(self.wrpo_dir, "wrpo"),
                     str(self.exported), "--dtype", a.export_dtype, "--overwrite"]]  # fmt: skip
        if step == "eval":
            return [self.eval_command(bench, questions) for bench, questions in self.questions()]
        return []

    def questions(self) -> list[tuple[str, str]]:
        a = self.args
        return [(b, q) for b, q in (("mt_bench", a.mt_bench), ("alpaca_eval", a.alpaca_eval),
                                    ("arena_hard", a.arena_hard)) if q]  # fmt: skip

    def eval_command(self, bench: str, questions: str) -> list[str]:
        out = (
            self.work / "eval" / bench / ("model_outputs.json" if bench == "alpaca_eval" else "model_answer")
        )
        cmd = [sys.executable, str(ROOT / "scripts" / "eval" / "generate_answers.py"), bench, "--model",
               str(self.exported), "--questions", questions, "--output", str(out), "--model-id", self.args.model_id,
               "--backend", self.args.backend]  # fmt: skip
        return cmd + (
            ["--max-new-tokens", str(self.args.eval_max_new_tokens)] if self.args.eval_max_new_tokens else []
        )

    def write_prompts(self) -> None:
        """Prompts of the WRPO and held-out splits (the recipe's own split) with their source responses."""
        from wrpo_nemo.data.records import ReadConfig, read_examples
        from wrpo_nemo.data.splits import SplitConfig, split_of

        resolved = json.loads((self.sft_dir / "run_config.json").read_text())
        split = SplitConfig(**resolved["data"]["split"])
        examples, _ = read_examples([self.args.records], ReadConfig(on_invalid="skip"))
        kept = [e for e in examples if split_of(e.prompt_id, split) != "sft"]
        if not kept:
            raise SystemExit("no prompt of the records falls in the WRPO or evaluation split")
        self.data.mkdir(parents=True, exist_ok=True)
        prompts = [{"prompt_id": e.prompt_id, "prompt": list(e.prompt)} for e in kept]
        sources = [
            {**p, "model": "source", "seed": 0, "response": e.source_chosen}
            for p, e in zip(prompts, kept, strict=True)
        ]
        for path, rows in ((self.prompts, prompts), (self.sources, sources)):
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
            tmp.replace(path)
        print(
            f"prompts: {len(kept)} of {len(examples)} records are WRPO or held-out prompts -> {self.prompts}"
        )


def run_step(pipe: Pipeline, step: str, dry_run: bool) -> None:
    """Run one step unless its marker says it finished; write the marker after it succeeds."""
    marker = pipe.work / "done" / step
    if marker.exists():
        print(f"[{step}] done before, skipped")
        return
    print(f"[{step}]", flush=True)
    if step == "prompts" and not dry_run:
        pipe.write_prompts()
    commands = pipe.commands(step)
    for cmd in commands:
        print("+ " + shlex.join(cmd), flush=True)
    if dry_run:
        return
    if step in SHARDED and len(commands) > 1:
        # One shard per GPU of this node: shard i sees only GPU i.
        procs = [subprocess.Popen(c, cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": str(i)})
                 for i, c in enumerate(commands)]  # fmt: skip
        statuses = [p.wait() for p in procs]
    else:
        statuses = [subprocess.run(c, cwd=ROOT).returncode for c in commands]
    if any(statuses):
        raise SystemExit(f"[{step}] failed with exit status {max(statuses)}; rerun to continue")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", required=True)
    p.add_argument("--base-model", required=True, help="HF folder of the target model (LLaMA-3-8B-Instruct)")
    p.add_argument(
        "--records", required=True, help="records with prompts and source responses (JSONL/Parquet)"
    )
    p.add_argument("--reward-model", required=True, help="HF folder of the reward model (ArmoRM)")
    p.add_argument(
        "--trust-remote-code", action="store_true", help="the reward model has custom code (ArmoRM)"
    )
    p.add_argument("--launcher", default=sys.executable, help='e.g. "torchrun --nproc-per-node 8"')
    p.add_argument("--sft-config", default="sft_llama3_8b")
    p.add_argument("--wrpo-config", default="wrpo_llama3_8b")
    p.add_argument("--override", action="append", default=[], help="key=value for both recipe stages")
    p.add_argument("--sft-override", action="append", default=[], help="key=value for the SFT stage")
    p.add_argument("--wrpo-override", action="append", default=[], help="key=value for the WRPO stage")
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[13, 21, 42, 79, 100], help="target samples per prompt"
    )
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=4096)
    p.add_argument("--backend", choices=["auto", "vllm", "transformers"], default="auto")
    p.add_argument("--shards", type=int, default=1, help="generate and score with N processes, one per GPU")
    p.add_argument("--export-dtype", choices=["bf16", "fp16", "fp32", "auto"], default="bf16")
    p.add_argument("--mt-bench", help="FastChat MT-Bench question.jsonl")
    p.add_argument("--alpaca-eval", help="AlpacaEval 2 instructions (alpaca_eval.json)")
    p.add_argument("--arena-hard", help="Arena-Hard-Auto question.jsonl")
    p.add_argument("--model-id", default="llama3-8b-sft-wrpo")
    p.add_argument("--eval-max-new-tokens", type=int)
    p.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset, in pipeline order")
    p.add_argument("--dry-run", action="store_true", help="print the commands of the steps still to do")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Steps run from the repository root: local paths must not depend on where this was started.
    for name in ("base_model", "reward_model", "records", "mt_bench", "alpaca_eval", "arena_hard"):
        value = getattr(args, name)
        if value and Path(value).exists():
            setattr(args, name, str(Path(value).resolve()))
    chosen = args.steps.split(",")
    unknown = sorted(set(chosen) - set(STEPS))
    if unknown:
        raise SystemExit(f"unknown steps {unknown}; known: {', '.join(STEPS)}")
    pipe = Pipeline(args)
    for step in (s for s in STEPS if s in chosen):
        run_step(pipe, step, args.dry_run)


if __name__ == "__main__":
    main()
