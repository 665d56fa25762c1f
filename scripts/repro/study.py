"""The paper's comparison at toy scale, on-policy, over seeds: one command, one table, two plots.

    python scripts/repro/study.py --out runs/study [--seeds 3] [--quick] [--jobs 2]

The task (``study_task.py``): addition of one- to three-digit numbers. The *target* is a tiny Llama that first
learns to write column arithmetic in words (its native style, imperfectly); the *source* is an oracle, always
right, that writes the columns in a shorter symbolic style the target never produces. Per seed, as the paper's
pipeline does:

1. ``sft``: the target is fine-tuned on the source responses y_ws of a third of the prompts (the recipe's SFT
   stage, ``wrpo_nemo.pipeline.run`` with ``stages=[sft]``), exported to Hugging Face.
2. ``generate``: the SFT model samples k responses per remaining prompt at temperature 0.8, top-p 0.95 (the
   pipeline's generate step, ``scripts/data/construct.py generate``, transformers backend).
3. ``score``: a rule-based scorer that sees only prompt and response (correctness, a no-answer penalty, a cost
   per token) scores the target samples and the source responses.
4. ``select``: y_ws = the best source response, y_wt / y_l = the best / worst target sample
   (``construct.py select``); a prompt whose target samples all score the same is left out and counted.
5. Stage 2 from the same SFT checkpoint for every objective (``OBJECTIVES``), each exported and evaluated on
   held-out questions: greedy answer accuracy, the mean score and accuracy of sampled answers, the share of
   answers in the source's style;
   the implicit rewards of y_ws, y_wt and y_l on the held-out split over training come from metrics.jsonl.

Then ``DIR/results.md`` (mean ± std over seeds, printed), ``DIR/results.json`` and the plots ``DIR/*.png``.
Every finished unit leaves its result file and is skipped on a rerun, so an interrupted study continues.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import study_report as report  # noqa: E402
import study_task as task  # noqa: E402

TARGET_NAME, SOURCE_NAME = "target-sft", "source-oracle"
SAMPLE_SEEDS = (13, 21, 42, 79, 100)
"""The paper's sampling seeds; study seed s adds 1000 * s."""
TEMPERATURE, TOP_P, MAX_NEW_TOKENS = 0.8, 0.95, 56
TOKENIZE = {"max_length": 80, "max_prompt_length": 24, "seq_length": 240}
SPLIT = {"eval_fraction": 0.1, "sft_fraction": 1 / 3, "salt": "wrpo-repro"}
"""The study's split of its pool: 10% held out (stage 2's held-out rewards), a third of the rest to SFT, the
other two thirds to stage 2."""

OBJECTIVES: dict[str, tuple[str, dict | None]] = {
    "sft": ("SFT only", None),
    "dpo_wt": ("DPO (y_wt, y_l)", {"preference": "dpo", "kind": "constant", "alpha_max": 0.0}),
    "dpo_ws": ("DPO (y_ws, y_l)", {"preference": "dpo", "kind": "constant", "alpha_max": 1.0}),
    "dpo_both": ("DPO on both pairs", {"preference": "dpo_pair_mean", "kind": "constant", "alpha_max": 0.0}),
    "wrpo_linear": ("WRPO alpha 0 -> 0.1", {"preference": "dpo", "kind": "linear", "alpha_max": 0.1}),
    "wrpo_fixed_0.1": ("WRPO alpha = 0.1", {"preference": "dpo", "kind": "constant", "alpha_max": 0.1}),
    "wrpo_fixed_0.5": ("WRPO alpha = 0.5", {"preference": "dpo", "kind": "constant", "alpha_max": 0.5}),
}
"""Stage-2 objectives as recipe settings (``wrpo.loss.preference``, ``wrpo.alpha.kind``, ``alpha_max``). With
the chosen reward alpha r(y_ws) + (1 - alpha) r(y_wt), constant alpha 0 is DPO on (y_wt, y_l), constant alpha 1
DPO on (y_ws, y_l); ``dpo_pair_mean`` is the mean of the two DPO losses (alpha unused)."""


@dataclass(frozen=True)
class Scale:
    """How big the study is."""

    pool: int
    """Questions of the study: SFT third, stage-2 rest, held-out slice (by prompt-id hash)."""
    native: int
    """Questions (disjoint from the pool) the target learns its native terse style from."""
    test: int
    """Held-out questions (disjoint from both) the exported models answer."""
    native_epochs: int
    sft_epochs: int
    samples: int
    """Target samples per prompt (k)."""
    wrpo_epochs: int
    eval_samples: int
    """Sampled answers per test question for the mean score."""
    eval_interval: int
    """Stage-2 steps between held-out reward evaluations."""
    batch: int = 32
    """Global batch (prompts) of every stage."""
    lr_native: float = 3e-3
    lr_sft: float = 3e-3
    lr_wrpo: float = 1e-4
    beta: float = 1.0
    layers: int = 2
    hidden: int = 64


FULL = Scale(pool=3000, native=3000, test=1000, native_epochs=3, sft_epochs=8, samples=5, wrpo_epochs=2,
             eval_samples=2, eval_interval=10)  # fmt: skip
QUICK = Scale(pool=240, native=240, test=48, native_epochs=2, sft_epochs=2, samples=3, wrpo_epochs=1,
              eval_samples=1, eval_interval=2, batch=16)  # fmt: skip


# ------------------------------------------------------------------------------------------------ files


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1), encoding="utf-8")
    tmp.replace(path)


def record(prompt_id: str, prompt: str, ws: str, wt: str, wl: str) -> dict:
    """A record in the released layout (chosen = [y_ws, y_wt], rejected = [y_l])."""
    reply = [{"role": "assistant", "content": text} for text in (ws, wt, wl)]
    return {
        "prompt_id": prompt_id,
        "prompt": task.message(prompt),
        "chosen": reply[:2],
        "rejected": reply[2:],
    }


# ------------------------------------------------------------------------------------------------ data


def build_data(out: Path, scale: Scale) -> dict[str, Path]:
    """The study's questions (three disjoint sets) and the records each stage reads.

    ``native.jsonl``: terse answers the target learns its style from. ``source.jsonl``: every pool question with
    the source's worked answer (the SFT stage reads y_ws only; the records repeat it in the y_wt and y_l roles,
    which SFT never reads). ``test.jsonl``: the held-out questions, as prompt records.
    """
    data = out / "data"
    paths = {name: data / f"{name}.jsonl" for name in ("native", "source", "test")}
    if all(p.is_file() for p in paths.values()):
        return paths
    questions = task.prompts(scale.pool + scale.native + scale.test, seed=0)
    pool, native = questions[: scale.pool], questions[scale.pool : scale.pool + scale.native]
    test = questions[scale.pool + scale.native :]
    write_jsonl(paths["native"], [record(i, task.question(a, b), *[task.native_answer(a, b)] * 3)
                                  for i, a, b in native])  # fmt: skip
    write_jsonl(paths["source"], [record(i, task.question(a, b), *[task.worked_answer(a, b)] * 3)
                                  for i, a, b in pool])  # fmt: skip
    write_jsonl(paths["test"], [{"prompt_id": i, "prompt": [task.message(task.question(a, b))]}
                                for i, a, b in test])  # fmt: skip
    return paths


def random_base(folder: Path, scale: Scale) -> Path:
    """A randomly initialised Llama with the task's tokenizer (the architecture of every model of the study)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = task.build_tokenizer(str(folder))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=scale.hidden, intermediate_size=2 * scale.hidden,
        num_hidden_layers=scale.layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------ training


def stage_config(
    run_dir: Path,
    *,
    stage: str,
    start: Path,
    records: Path,
    cache: Path,
    seed: int,
    split: dict,
    optim: dict,
    batch: int,
    epochs: int,
    eval_interval: int = 0,
    wrpo: dict | None = None,
) -> dict:
    """The recipe's config (``wrpo_nemo.training.config.RunConfig`` keys) of one stage of the study."""
    section = {"optim": {"min_lr": 0.0, "warmup_ratio": 0.1, "weight_decay": 0.0, "clip_grad": 1.0, **optim},
               "global_batch_size": batch, "micro_batch_size": min(batch, 16), "epochs": epochs}  # fmt: skip
    if stage == "wrpo":
        assert wrpo is not None
        section["micro_batch_size"] = min(batch, 8)
        section["loss"] = {"beta": wrpo["beta"], "preference": wrpo["preference"], "label_smoothing": 0.0}
        section["alpha"] = {"kind": wrpo["kind"], "alpha_max": wrpo["alpha_max"]}
        section["reference"] = "precompute"
    return {
        "run_dir": str(run_dir),
        "seed": seed,
        "stages": [stage],
        "model": {"hf_path": str(start), "precision": "fp32"},
        "data": {
            "toy": False,
            "source": {
                "sources": [str(records)],
                "cache_dir": str(cache),
                "num_workers": 1,
                "tokenize": TOKENIZE,
            },
            "split": split,
        },
        stage: section,
        "checkpoint": {"save_interval": 0, "keep_last": 1, "resume": False},
        "logging": {
            "log_interval": 1000,
            "eval_interval": eval_interval,
            "eval_prompts": 256,
            "tensorboard": False,
            "plots": False,
        },
        "export": {"hf": True, "dtype": "float32"},
    }


def train(config: dict) -> Path:
    """Run one stage through the recipe's ``run`` in this process; returns its Hugging Face export."""
    from wrpo_nemo.pipeline import run
    from wrpo_nemo.training.config import load_run_config

    stage = config["stages"][0]
    run_dir = Path(config["run_dir"])
    if run_dir.exists():  # an interrupted attempt: start the stage again
        shutil.rmtree(run_dir)
    result = run(load_run_config(config))[stage]
    # Only the export is kept: the megatron checkpoints of a tiny model are many small files.
    shutil.rmtree(run_dir / stage / "checkpoints", ignore_errors=True)
    shutil.rmtree(run_dir / "imported_hf", ignore_errors=True)
    print(f"[{run_dir.parent.name}] {stage}: {result.steps} steps", flush=True)
    return run_dir / stage / "hf"


# ------------------------------------------------------------------------------------------------ evaluation


def generate(model: Path, prompts: Path, out_dir: Path, seeds: list[int], temperature: float) -> list[dict]:
    """Responses of ``model`` through the pipeline's generate step (one per prompt and seed)."""
    from wrpo_nemo.data.construction.generate import GenerateConfig
    from wrpo_nemo.data.construction.generate import generate as generate_step

    cfg = GenerateConfig(model=str(model), model_name=TARGET_NAME, prompts=str(prompts), output_dir=str(out_dir),
                         seeds=seeds, temperature=temperature, top_p=TOP_P, max_new_tokens=MAX_NEW_TOKENS,
                         batch_size=64, backend="transformers", dtype="float32")  # fmt: skip
    return read_jsonl(Path(generate_step(cfg)))


def prompt_text(row: dict) -> str:
    """The user turn of a record's prompt (a message, or a list of messages)."""
    prompt = row["prompt"]
    return (prompt[-1] if isinstance(prompt, list) else prompt)["content"]


def evaluate(model: Path, test: Path, out_dir: Path, scale: Scale, seed: int) -> dict:
    """Greedy accuracy, the share of worked answers, and the mean score and accuracy of sampled answers."""
    from wrpo_nemo.data.toy import score_answer

    greedy = generate(model, test, out_dir / "greedy", [0], 0.0)
    sampled = generate(model, test, out_dir / "sampled", [seed * 1000 + s for s in range(scale.eval_samples)],
                       TEMPERATURE)  # fmt: skip

    def mean(values: list[float]) -> float:
        return sum(values) / max(1, len(values))

    return {
        "accuracy": mean([score_answer(prompt_text(r), r["response"]) for r in greedy]),
        "source_style": mean([task.style(r["response"]) == "source" for r in greedy]),
        "greedy_tokens": mean([task.num_tokens(r["response"]) for r in greedy]),
        "sample_score": mean([task.score(prompt_text(r), r["response"]) for r in sampled]),
        "sample_accuracy": mean([score_answer(prompt_text(r), r["response"]) for r in sampled]),
    }


def reward_curves(run_dir: Path, beta: float) -> dict:
    """From stage 2's metrics.jsonl: the held-out implicit rewards (beta x log-ratio) of y_ws, y_wt and y_l at
    every evaluation, from step 0 (policy = reference: every reward is 0); the training steps' values; and the
    reference (SFT) model's mean log-probs of the three held-out responses (log-prob minus reward / beta)."""
    rows = read_jsonl(run_dir / "wrpo" / "metrics.jsonl")
    curves: dict = {}
    for split in ("eval", "train"):
        picked = [r for r in rows if r.get("split") == split and "rewards/source_chosen" in r]
        zero = [{"step": 0, **dict.fromkeys(report.ROLES, 0.0)}] if split == "eval" else []
        curves[split] = zero + [{"step": r["step"], **{k: r[f"rewards/{k}"] for k in report.ROLES}}
                                for r in picked]  # fmt: skip
    first = next(r for r in rows if r.get("split") == "eval" and "rewards/source_chosen" in r)
    curves["reference_logps"] = {k: first[f"logps/{k}"] - first[f"rewards/{k}"] / beta for k in report.ROLES}
    return curves


# ------------------------------------------------------------------------------------------------ one seed


def run_seed(out: str, seed: int, scale_dict: dict, target: str, paths: dict[str, str]) -> dict:
    """SFT, sampling, scoring, selection, then every objective from the SFT checkpoint; returns the seed's
    results (also written to ``seed-<s>/results.json``)."""
    from wrpo_nemo.data.construction.select import SelectConfig, select
    from wrpo_nemo.data.splits import SplitConfig, split_of

    scale = Scale(**scale_dict)
    root = Path(out) / f"seed-{seed}"
    done = root / "results.json"
    if done.is_file():
        return json.loads(done.read_text())
    started = time.time()
    cache = root / "cache"
    sft_done = root / "sft" / "done.json"
    sft_hf = root / "sft" / "run" / "sft" / "hf"
    if not sft_done.is_file():
        config = stage_config(root / "sft" / "run", stage="sft", start=Path(target),
                              records=Path(paths["source"]), cache=cache, seed=seed, split=SPLIT,
                              optim={"lr": scale.lr_sft}, batch=scale.batch, epochs=scale.sft_epochs)  # fmt: skip
        train(config)
        write_json(sft_done, {"seconds": time.time() - started})
    timing = {"sft": json.loads(sft_done.read_text())["seconds"]}

    # The stage-2 prompts and held-out slice of the pool (the recipe's own split), with the source responses.
    data = root / "data"
    selected = data / "wrpo.jsonl"
    if not selected.is_file():
        t0 = time.time()
        split = SplitConfig(**SPLIT)
        pool = [r for r in read_jsonl(Path(paths["source"])) if split_of(r["prompt_id"], split) != "sft"]
        prompts = write_jsonl(data / "prompts.jsonl",
                              [{"prompt_id": r["prompt_id"], "prompt": [r["prompt"]]} for r in pool])  # fmt: skip
        seeds = [s + 1000 * seed for s in SAMPLE_SEEDS[: scale.samples]]
        samples = generate(sft_hf, prompts, data / "generated", seeds, TEMPERATURE)
        sources = [{"prompt_id": r["prompt_id"], "prompt": [r["prompt"]], "model": SOURCE_NAME, "seed": 0,
                    "response": r["chosen"][0]["content"]} for r in pool]  # fmt: skip
        scored = [{**r, "score": task.score(prompt_text(r), r["response"]), "score_truncated": False}
                  for r in samples + sources]  # fmt: skip
        write_jsonl(data / "scored" / "scored.jsonl", scored)
        select(SelectConfig(inputs=(str(data / "scored" / "scored.jsonl"),), target_model=TARGET_NAME,
                            output=str(selected)))  # fmt: skip
        write_json(data / "timing.json", {"seconds": time.time() - t0})
    timing["data"] = json.loads((data / "timing.json").read_text())["seconds"]
    selection = json.loads(Path(f"{selected}.report.json").read_text())
    selection.update(data_stats(data, selected))

    results: dict[str, dict] = {}
    for name, (_, settings) in OBJECTIVES.items():
        unit = root / name
        unit_done = unit / "result.json"
        if not unit_done.is_file():
            t0 = time.time()
            model = sft_hf
            curves = None
            if settings is not None:
                config = stage_config(unit / "run", stage="wrpo", start=sft_hf, records=selected, cache=cache,
                                      seed=seed, split=SPLIT, optim={"lr": scale.lr_wrpo}, batch=scale.batch,
                                      epochs=scale.wrpo_epochs, eval_interval=scale.eval_interval,
                                      wrpo={**settings, "beta": scale.beta})  # fmt: skip
                model = train(config)
                curves = reward_curves(unit / "run", scale.beta)
            metrics = evaluate(model, Path(paths["test"]), unit / "eval", scale, seed)
            write_json(unit_done, {"metrics": metrics, "curves": curves, "seconds": time.time() - t0})
        results[name] = json.loads(unit_done.read_text())
        timing[name] = results[name]["seconds"]
        print(f"[seed {seed}] {name}: {json.dumps(results[name]['metrics'])}", flush=True)
    summary = {"seed": seed, "selection": selection, "objectives": results, "seconds": timing}
    write_json(done, summary)
    return summary


def data_stats(data: Path, selected: Path) -> dict:
    """What the target's samples and the selected records look like (accuracy, style, who scores higher)."""
    from wrpo_nemo.data.toy import score_answer

    scored = read_jsonl(data / "scored" / "scored.jsonl")
    samples = [r for r in scored if r["model"] == TARGET_NAME]
    chosen = read_jsonl(selected)

    def share(values: list[bool]) -> float:
        return sum(values) / max(1, len(values))

    texts = {role: [r["chosen"][0]["content"] if role == "ws" else r["chosen"][1]["content"] if role == "wt"
                    else r["rejected"][0]["content"] for r in chosen] for role in ("ws", "wt", "wl")}  # fmt: skip
    prompts = [prompt_text(r) for r in chosen]
    return {
        "sample_accuracy": share([score_answer(prompt_text(r), r["response"]) for r in samples]),
        "sample_source_style": share([task.style(r["response"]) == "source" for r in samples]),
        **{
            f"{role}_accuracy": share([score_answer(p, t) for p, t in zip(prompts, texts[role], strict=True)])
            for role in ("wt", "wl")
        },
        "wt_source_style": share([task.style(t) == "source" for t in texts["wt"]]),
        "wt_equals_ws": share(
            [task.tokens(a) == task.tokens(b) for a, b in zip(texts["wt"], texts["ws"], strict=True)]
        ),
        "ws_scores_above_wt": share(
            [r["scores"]["source_chosen"] > r["scores"]["target_chosen"] for r in chosen]
        ),
    }


# ------------------------------------------------------------------------------------------------ the study


def build_target(out: Path, scale: Scale, paths: dict[str, Path]) -> dict:
    """The study's target model: a random tiny Llama trained on terse answers (its native style), evaluated."""
    root = out / "target"
    done = root / "result.json"
    hf = root / "run" / "sft" / "hf"
    if not done.is_file():
        t0 = time.time()
        base = random_base(root / "random", scale)
        split = {"eval_fraction": 0.02, "sft_fraction": 0.999, "salt": "native"}
        config = stage_config(root / "run", stage="sft", start=base, records=paths["native"],
                              cache=root / "cache", seed=0, split=split, optim={"lr": scale.lr_native},
                              batch=scale.batch, epochs=scale.native_epochs)  # fmt: skip
        train(config)
        metrics = evaluate(hf, paths["test"], root / "eval", scale, 0)
        write_json(done, {"metrics": metrics, "seconds": time.time() - t0})
    result = json.loads(done.read_text())
    print(f"[target] {json.dumps(result['metrics'])}", flush=True)
    return {"hf": str(hf), **result}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="study folder (results.md, results.json, plots, runs)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 1..N (SFT order, samples, stage-2 order)")
    p.add_argument("--quick", action="store_true", help="a few minutes: few prompts, short runs (the test)")
    p.add_argument("--jobs", type=int, default=1, help="seeds run side by side in N processes")
    p.add_argument("--wrpo-lr", type=float, help=f"stage-2 peak learning rate (default {FULL.lr_wrpo})")
    p.add_argument("--beta", type=float, help=f"stage-2 beta (default {FULL.beta})")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    changes = {k: v for k, v in (("lr_wrpo", args.wrpo_lr), ("beta", args.beta)) if v is not None}
    scale = replace(QUICK if args.quick else FULL, **changes)
    # Finished units are reused on a rerun: only with the settings they were made with.
    settings = out / "scale.json"
    if settings.is_file() and json.loads(settings.read_text()) != asdict(scale):
        raise SystemExit(f"{out} holds a study with other settings ({settings}); choose another --out")
    write_json(settings, asdict(scale))
    started = time.time()
    paths = build_data(out, scale)
    target = build_target(out, scale, paths)
    seeds = list(range(1, args.seeds + 1))
    jobs = [(str(out), s, asdict(scale), target["hf"], {k: str(v) for k, v in paths.items()}) for s in seeds]
    if args.jobs > 1:
        # Fresh interpreters: this process has run torch.distributed and megatron already.
        with ProcessPoolExecutor(
            max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            per_seed = list(pool.map(run_seed, *zip(*jobs, strict=True)))
    else:
        per_seed = [run_seed(*job) for job in jobs]
    wall = time.time() - started
    results = report.write(
        out, target, per_seed, OBJECTIVES, wall, scale=asdict(scale), quick=args.quick, jobs=args.jobs
    )
    print((out / "results.md").read_text())
    return results


if __name__ == "__main__":
    main()
