"""WRPO step throughput of this engine beside TRL 1.16's DPOTrainer: one process, same weights, same prompts.

How it runs. One process, one CPU thread, fp32. For every data set a small Llama (``--preset``, random weights,
the vocabulary of the data set's tokenizer) is saved once as a Hugging Face folder; TRL's ``DPOTrainer`` loads
it twice (the policy and an explicit ``ref_model``), the engine imports it with ``load_hf_weights`` (megatron's
groups are set up once: world size 1, gloo). For every (data set, row length) the trainers then advance one
optimizer step at a time, interleaved (engine ``shared_prompt``, engine ``separate``, TRL, engine
``shared_prompt``, ...), so a busy moment of the shared machine falls on every side alike instead of on whichever
ran second. TRL is driven by hand the way ``Trainer.train`` does it: an iterator over ``get_train_dataloader()``,
``training_step``, gradient clipping at 1.0, ``optimizer.step``, ``lr_scheduler.step``, ``zero_grad``; the engine
by ``TrainLoop.train_step`` (the loop the recipe runs). A step's time includes fetching and collating (TRL) or packing (engine) its batch. The first
``--warmup`` steps are not timed; the table gives the median and the min of the rest.

Same prompts. All sides get the same ``--batch`` prompts at every step, in the engine's own length-stratified
order (``PromptOrder``), handed to each engine loader and to TRL's sequential sampler; the table says whether
that held. TRL gets the settings that make it fastest here: activation (gradient) checkpointing off and
``bf16=False`` (TRL defaults both on; bf16 autocast on a CPU is slow), ``padding_free=True`` (TRL 1.16 turns it
back off with a warning, "temporarily unavailable after a refactor", and pads every batch to its longest
sequence; reported), its default fused AdamW, and ``sdpa`` attention.

Reference cost counted on both sides. Both precompute reference log-probs over the prompts used before training
(TRL: ``precompute_ref_log_probs=True``, its own ``_precompute_ref_logps``, re-run in each of ``--ref-rounds``
interleaved rounds; the engine: ``compute_reference_logps``). The pass is divided by the number of prompts, and
that per-prompt cost times ``--batch`` is added to each side's step time: every s/step and rate below includes
it (the ``ref s/step`` column is that share).

Work done. TRL sees only the pair (y_wt, y_l) = (chosen[1], rejected[0]) of each record, the engine all three
responses: response-sequences/s counts 3 per prompt for the engine and 2 for TRL; prompts/s counts the data
consumed. Tokens per prompt: for the engine, the non-padding tokens of its packed rows (``real``) and all row
tokens (``computed``); for TRL, the attention-mask sum of its padded batch and the batch tensor size. Attention
FLOPs per prompt (forward, estimate) = 4 x layers x hidden x the sum over attention groups of
query length x key length / 2: for TRL every padded sequence is a group of the padded length; for the engine's
``separate`` layout every ``prompt + response`` segment; for ``shared_prompt`` the prompt attends to itself
(p^2 / 2) and each response to the prompt and itself (r p + r^2 / 2).

Data. ``ultrafeedback-like``: ``benchmarks/data_pipeline.write_records`` (prompts ~150 words, responses ~350,
long tails, one token per word, Llama 3 chat template), max_length 2048 and max_prompt_length 1800 as the 8B
config, cached once per row length: the cache's length policy drops a record whose three segments do not fit
one row (counted as in the separate layout, so rows of 2048 lose about a third of the records), and just enough
records are written for ``(--warmup + --steps) x --batch`` prompts to remain (the numbers are printed). Rows of
4096 keep longer prompts than rows of 2048, so the two tables hold different prompts: compare within a table. ``toy``: the arithmetic toy task at max_length 64, rows of 256, ``--toy-batch`` prompts.

Layouts. The engine runs ``shared_prompt`` (each prompt once, its three responses after it) and ``separate``
(each response with its own copy of the prompt). Without pipeline parallelism the engine computes only the real
tokens of its packed rows (``PackedBatch.without_padding``), so ``computed`` is their count rounded up to a
multiple of 16 per micro-batch.

    python benchmarks/wrpo_vs_trl.py [--data ultrafeedback,toy] [--rows 2048,4096] [--steps 6] [--warmup 2]
        [--batch 8] [--toy-batch 16] [--preset toy] [--ref-rounds 2]

Measured 2026-11-29 on the 2-core shared CPU machine, defaults, 311 s wall. Ultrafeedback-like, rows 2048 (64
of the 74 prompts the cache kept from 113 records; 37 dropped because their three separate segments exceed 2048
tokens, 2 for a response too long): s/step, reference share included, median (min): engine shared_prompt 2.18
(2.08), separate 2.68 (2.55), TRL 4.40 (4.15); response-sequences/s 11.01, 8.94 and 3.63, i.e. 3.03x and 2.46x
TRL, and shared_prompt 1.23x separate; prompts/s 2.02x and 1.64x TRL. The engine computes 1,161 / 1,463 tokens
per prompt (its real tokens: padding is dropped without pipeline parallelism); TRL pads its 16 sequences to
735-1,030 tokens, 1,681 computed for 976 real. Rows of 4096 (111 of 113 records kept, longer prompts): 2.80
(2.52), 3.45 (3.37) and 10.56 (8.38) s/step; response-sequences/s 5.66x and 4.58x TRL (shared 1.24x separate);
TRL pads to 1,153-1,986 tokens (3,003 computed per prompt for 1,231 real, 4.8 GFLOP of attention per prompt
against 1.2-1.4 for the engine). Toy (16 prompts of about 50 tokens per step, rows of 256): 0.150, 0.205 and
0.097 s/step, 0.97x and 0.71x TRL in response-sequences/s: with so little work per step the engine's fixed
per-step costs (megatron's schedule, DDP buffers and optimizer) weigh as much as the model.

With ``--preset small`` (hidden 512, 4 layers: the matmuls hold most of the FLOPs, as in the 8B), same day,
``--data ultrafeedback --rows 2048``, quiet machine. Defaults (64 prompts, 766 s wall): engine shared_prompt
16.21 (14.97), separate 20.98 (20.00), TRL 27.44 (25.24) s/step; response-sequences/s 2.54x and 1.96x TRL;
shared_prompt / separate 1.29x against a forward-FLOP ratio of 1.25x (1,161 vs 1,463 tokens per prompt).
``--steps 8`` (80 prompts, a mix with relatively shorter prompts, 930 s): 16.63, 20.60 and 30.42 s/step; 2.74x
and 2.22x TRL; shared_prompt / separate 1.24x against a FLOP ratio of 1.21x (1,236 vs 1,509 tokens). In both the
shared layout is slightly more than FLOP-for-FLOP faster (fewer, shorter attention segments and fewer rows).
``--rows 4096`` (1,372 s): 22.54 (20.13), 29.08 (26.16) and 63.52 (51.37) s/step; 4.23x and 3.28x TRL; shared /
separate 1.29x against a FLOP ratio of 1.26x (1,435 vs 1,837 tokens per prompt; TRL computes 2,926 for 1,257 real).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field, fields
from functools import cache, partial
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# Import-time notices of megatron-core on a CPU (no Apex / TransformerEngine) and deprecations of the libraries.
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings(
    "ignore", message=".*(Apex|Transformer Engine|cuda_graph_scope|torch.distributed is disabled)"
)

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_pipeline import WORDS, write_records  # noqa: E402

UF, TOY = "ultrafeedback-like", "toy"
DATA_NAMES = {"ultrafeedback": UF, "ultrafeedback-like": UF, "uf": UF, "toy": TOY}
TOY_ROWS = 256
ALPHA = 0.05
BETA = 0.1
LR = 5e-6


@dataclass
class DataSpec:
    label: str
    max_length: int
    max_prompt_length: int
    rows: list[int]
    batch: int


@dataclass
class Side:
    """Timings and the work of the timed steps of one trainer."""

    name: str
    responses_per_prompt: int
    step_seconds: list[float] = field(default_factory=list)
    ref_seconds: list[float] = field(default_factory=list)
    """Whole reference passes over the prompts used, one per round."""
    steps: list[dict] = field(default_factory=list)
    """Per timed step: prompts (dataset positions), real tokens, computed tokens, attention pairs."""


# ---------------------------------------------------------------------------------------------------- data


def _tokenizer(label: str):
    from wrpo_nemo.data.toy import build_toy_tokenizer, build_word_tokenizer

    return build_word_tokenizer(WORDS, "llama3") if label == UF else build_toy_tokenizer()


def _write_records(label: str, path: Path, n: int) -> None:
    from wrpo_nemo.data.toy import build_toy_dataset

    path.parent.mkdir(parents=True, exist_ok=True)
    if label == UF:
        write_records(str(path), n, seed=0)
    else:
        build_toy_dataset(str(path.parent), n, seed=0)


def _build_cache(records: Path, folder: Path, tokenizer, spec: DataSpec, rows: int):
    from wrpo_nemo.data.cache import DataConfig, build_or_load
    from wrpo_nemo.data.tokenize import TokenizeConfig

    tokenize = TokenizeConfig(
        max_length=spec.max_length, max_prompt_length=spec.max_prompt_length, seq_length=rows
    )
    cfg = DataConfig(
        sources=[str(records)], cache_dir=str(folder / "cache"), num_workers=1, tokenize=tokenize
    )
    return build_or_load(cfg, tokenizer)


def prepare_data(folder: Path, spec: DataSpec, tokenizer, need: int) -> tuple[Path, int, dict]:
    """Write just enough records that every row length's cache keeps ``need`` prompts; the caches by rows."""
    records = folder / "records" / "train.jsonl"
    n = need + 8
    while True:
        _write_records(spec.label, records, n)
        datasets = {rows: _build_cache(records, folder, tokenizer, spec, rows) for rows in spec.rows}
        fewest = min(len(d) for d in datasets.values())
        if fewest >= need:
            return records, n, datasets
        n = int(n * need / max(fewest, 1) * 1.15) + 8


def save_model(folder: Path, tokenizer, preset: str, max_positions: int) -> Path:
    import dataclasses

    from transformers import LlamaConfig, LlamaForCausalLM

    from wrpo_nemo.models.llama import hf_config_from_model_config
    from wrpo_nemo.models.presets import get_preset

    preset_cfg = get_preset(preset)
    cfg = dataclasses.replace(
        preset_cfg,
        vocab_size=len(tokenizer),
        max_position_embeddings=max(preset_cfg.max_position_embeddings, max_positions),
        tie_word_embeddings=False,
    )
    hf_dir = folder / "hf"
    torch.manual_seed(0)
    config = LlamaConfig(
        **hf_config_from_model_config(cfg, torch.float32),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    return hf_dir


def _messages(value) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return [value] if isinstance(value, dict) else list(value)


def trl_rows(records: Path, dataset, order: np.ndarray) -> list[dict]:
    """TRL's preference rows for the engine's dataset positions ``order``: (y_wt, y_l) = (chosen[1], rejected[0])."""
    by_id = {}
    for line in records.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        by_id[record["prompt_id"]] = record
    rows = []
    for position in order:
        record = by_id[dataset.prompt_ids[int(position)]]
        rows.append(
            {
                "prompt": _messages(record["prompt"]),
                "chosen": [record["chosen"][1]],
                "rejected": [record["rejected"][0]],
            }
        )
    return rows


def step_order(dataset, indices: np.ndarray, batch: int) -> np.ndarray:
    """The engine's epoch-0 prompt order (length-stratified by the separate layout's row tokens)."""
    from wrpo_nemo.data.loader import PromptOrder
    from wrpo_nemo.data.packing import group_lengths

    lengths = group_lengths(dataset, "wrpo", "separate")
    return PromptOrder(indices, batch, batch, 1, 0, lengths).epoch_order(0)


def indices_for_order(order: np.ndarray, seed: int = 0) -> np.ndarray:
    """Indices whose unstratified epoch-0 shuffle (``stratify_window=1``) is ``order``, so every loader yields it."""
    perm = np.random.default_rng([seed, 0]).permutation(len(order))
    indices = np.empty_like(order)
    indices[perm] = order
    return indices


def attention_pairs(dataset, prompts: np.ndarray, layout: str) -> float:
    """Sum over the attention groups of these prompts of query length x key length / 2 (causal)."""
    p = dataset.lengths("prompt")[prompts].astype(np.float64)
    rs = [
        dataset.lengths(name)[prompts].astype(np.float64)
        for name in ("source_chosen", "target_chosen", "rejected")
    ]
    if layout == "shared_prompt":
        return float(np.sum(p * p / 2 + sum(r * p + r * r / 2 for r in rs)))
    return float(np.sum(sum((p + r) ** 2 / 2 for r in rs)))


# ---------------------------------------------------------------------------------------------------- engine


class EngineRunner:
    """One engine variant (a layout) on its own copy of the weights."""

    def __init__(self, ctx: dict, layout: str) -> None:
        from wrpo_nemo.converters.hf_import import load_hf_weights
        from wrpo_nemo.training.engine import build_model

        self.ctx, self.layout = ctx, layout
        self.side = Side(f"engine {layout}", 3)
        self.cfg = ctx["model_cfg"]
        self.model = build_model(self.cfg)
        load_hf_weights(self.model, ctx["hf_dir"], ctx["folder"] / "imported")
        self.reference = None

    def reference_pass(self) -> None:
        from wrpo_nemo.training.reference import compute_reference_logps

        ctx = self.ctx
        start = time.perf_counter()
        self.reference = compute_reference_logps(
            self.model,
            ctx["dataset"],
            ctx["indices"],
            micro_batch_size=ctx["batch"],
            seq_length=ctx["rows"],
            pad_id=ctx["pad_id"],
            device=ctx["device"],
            vocab_size=self.cfg.vocab_size,
            layout=self.layout,
        )
        self.side.ref_seconds.append(time.perf_counter() - start)

    def start(self, total_steps: int) -> None:
        from wrpo_nemo.alpha import AlphaSchedule
        from wrpo_nemo.data.loader import PackedBatchLoader
        from wrpo_nemo.training.engine import OptimSettings, build_optimizer, wrap_ddp
        from wrpo_nemo.training.loop import TrainLoop
        from wrpo_nemo.training.stages import Reference, WRPOStage
        from wrpo_nemo.training.step import WrpoLossSettings

        ctx = self.ctx
        self.loader = PackedBatchLoader(
            ctx["dataset"],
            indices_for_order(ctx["order"]),
            stage="wrpo",
            seq_length=ctx["rows"],
            global_batch_size=ctx["batch"],
            micro_batch_size=ctx["batch"],
            dp_rank=0,
            dp_size=1,
            seed=0,
            pad_id=ctx["pad_id"],
            reference_logps=self.reference,
            stratify_window=1,
            layout=self.layout,
        )
        ddp = wrap_ddp(self.model)
        optimizer, scheduler = build_optimizer(ddp, OptimSettings(lr=LR), total_steps)
        stage = WRPOStage(
            self.cfg.vocab_size,
            WrpoLossSettings(beta=BETA),
            AlphaSchedule(kind="constant", alpha_max=ALPHA),
            Reference("precomputed", self.reference),
            ctx["device"],
        )
        # The recipe's loop.
        self.loop = TrainLoop(
            ddp, optimizer, scheduler, self.loader, stage, device=ctx["device"], total_steps=total_steps
        )

    def step(self, timed: bool) -> None:
        start = time.perf_counter()
        self.loop.train_step()
        seconds = time.perf_counter() - start
        batches = self.loop.last_batches
        if timed:
            prompts = np.concatenate([b.prompt_index.numpy() for b in batches])
            self.side.step_seconds.append(seconds)
            self.side.steps.append(
                {
                    "prompts": prompts,
                    "real": sum(int((b.segment_ids >= 0).sum()) for b in batches),
                    "computed": sum(b.without_padding().tokens.numel() for b in batches),
                    "pairs": attention_pairs(self.ctx["dataset"], prompts, self.layout),
                    "rows": int(batches[0].tokens.shape[0]),
                }
            )


# ---------------------------------------------------------------------------------------------------- TRL


@cache
def _timed_trainer_class():
    from trl import DPOTrainer

    class TimedDPOTrainer(DPOTrainer):
        """DPOTrainer whose reference precompute is timed and can be run again."""

        def _precompute_ref_logps(self, dataset, name, batch_size):
            self.bench_ref_args = (dataset, name, batch_size)
            self.bench_ref_batches = 0
            start = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            self.bench_ref_seconds = [*getattr(self, "bench_ref_seconds", []), time.perf_counter() - start]
            return out

        def compute_ref_log_probs(self, model, inputs):
            self.bench_ref_batches += 1
            return super().compute_ref_log_probs(model, inputs)

    return TimedDPOTrainer


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class TrlRunner:
    """TRL's DPOTrainer on the (y_wt, y_l) pairs of the same prompts, driven one step at a time."""

    def __init__(self, ctx: dict) -> None:
        from datasets import Dataset
        from transformers import AutoModelForCausalLM
        from trl import DPOConfig

        self.ctx = ctx
        self.side = Side("TRL DPOTrainer", 2)
        order = ctx["order"]
        data = Dataset.from_list(trl_rows(ctx["records"], ctx["dataset"], order))
        load = partial(
            AutoModelForCausalLM.from_pretrained,
            ctx["hf_dir"],
            attn_implementation="sdpa",
            dtype=torch.float32,
        )
        # TRL turns activation checkpointing and bf16 on by default: off, for fp32 without recomputation as the engine.
        names = {f.name for f in fields(DPOConfig)}
        checkpointing = (
            "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
        )
        args = DPOConfig(
            output_dir=str(ctx["folder"] / f"trl-{ctx['rows']}"),
            per_device_train_batch_size=ctx["batch"],
            precompute_ref_log_probs=True,
            precompute_ref_batch_size=ctx["batch"],
            max_length=ctx["spec"].max_length,
            beta=BETA,
            learning_rate=LR,
            max_grad_norm=1.0,
            use_cpu=True,
            bf16=False,
            **{checkpointing: False},
            padding_free=True,
            train_sampling_strategy="sequential",
            dataloader_num_workers=0,
            disable_dropout=True,
            report_to=[],
            logging_steps=10_000,
            save_strategy="no",
            seed=0,
        )
        capture = _Capture()
        logger = logging.getLogger("trl")
        logger.addHandler(capture)
        try:
            self.trainer = _timed_trainer_class()(
                model=load(),
                ref_model=load(),
                args=args,
                train_dataset=data,
                processing_class=ctx["tokenizer"],
            )
        finally:
            logger.removeHandler(capture)
        self.warnings = capture.messages
        a = self.trainer.args
        self.settings = (
            f"optimizer {getattr(a.optim, 'value', a.optim)}, activation checkpointing {getattr(a, checkpointing)}, bf16 {a.bf16}, "
            f"max_length {a.max_length}, attention {self.trainer.model.config._attn_implementation}"
        )
        self.padding_free_requested = args.padding_free
        self.padding_free_used = bool(self.trainer.padding_free)
        self.constructor_ref_seconds = self.trainer.bench_ref_seconds[0]
        self.num_prompts = len(self.trainer.train_dataset)
        if self.num_prompts != len(order):
            raise RuntimeError(
                f"TRL kept {self.num_prompts} of the {len(order)} prompts; the steps would not line up"
            )

    def reference_pass(self) -> None:
        """TRL's own precompute again (the constructor ran it once); the result replaces the training set."""
        t = self.trainer
        start = time.perf_counter()
        t.train_dataset = t._precompute_ref_logps(*t.bench_ref_args)
        seconds = time.perf_counter() - start
        expected = -(-len(t.train_dataset) // self.ctx["batch"])
        if t.bench_ref_batches != expected:
            raise RuntimeError(
                f"TRL's reference precompute ran {t.bench_ref_batches} batches, expected {expected} (a cache hit?)"
            )
        self.side.ref_seconds.append(seconds)

    def token_lengths(self) -> np.ndarray:
        """``[N, 3]`` prompt, chosen and rejected token counts of TRL's tokenised rows."""
        ds = self.trainer.train_dataset
        return np.array(
            [
                [len(p), len(c), len(r)]
                for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"], strict=True)
            ]
        )

    def start(self, total_steps: int) -> None:
        t = self.trainer
        t.create_optimizer_and_scheduler(num_training_steps=total_steps)
        t.current_gradient_accumulation_steps = 1
        self.model = t.model
        self.model.train()
        self.batches = iter(t.get_train_dataloader())
        self.position = 0

    def step(self, timed: bool) -> None:
        t, model = self.trainer, self.model
        start = time.perf_counter()
        inputs = next(self.batches)
        t.training_step(model, inputs)
        t.accelerator.clip_grad_norm_(model.parameters(), t.args.max_grad_norm)
        t.optimizer.step()
        t.lr_scheduler.step()
        model.zero_grad()
        seconds = time.perf_counter() - start
        batch = self.ctx["batch"]
        prompts = self.ctx["order"][self.position : self.position + batch]
        self.position += batch
        if timed:
            sequences, padded = inputs["input_ids"].shape
            self.side.step_seconds.append(seconds)
            self.side.steps.append(
                {
                    "prompts": prompts,
                    "real": int(inputs["attention_mask"].sum()),
                    "computed": int(inputs["input_ids"].numel()),
                    "pairs": sequences * padded * padded / 2,
                    "padded_length": padded,
                }
            )


# ---------------------------------------------------------------------------------------------------- run


def run_case(ctx: dict, layouts: list[str], args: argparse.Namespace) -> dict:
    """Build every side for one (data set, rows), time the reference passes and the steps, interleaved."""
    engines = [EngineRunner(ctx, layout) for layout in layouts]
    trl = TrlRunner(ctx)
    runners = [*engines, trl]
    for _ in range(args.ref_rounds):
        for runner in runners:
            runner.reference_pass()
    total = args.warmup + args.steps
    for runner in runners:
        runner.start(total)
    for step in range(total):
        for runner in runners:
            runner.step(timed=step >= args.warmup)
    trl_lengths = trl.token_lengths()
    ds, order = ctx["dataset"], ctx["order"]
    engine_lengths = np.stack(
        [ds.lengths("prompt")[order], ds.lengths("target_chosen")[order], ds.lengths("rejected")[order]],
        axis=1,
    )
    result = {
        "sides": [r.side for r in runners],
        "trl_warnings": trl.warnings,
        "padding_free": (trl.padding_free_requested, trl.padding_free_used),
        "trl_constructor_ref_seconds": trl.constructor_ref_seconds,
        "length_mismatches": int(np.sum(np.any(trl_lengths != engine_lengths, axis=1))),
        "trl_prompts": trl.num_prompts,
        "trl_settings": trl.settings,
        "rows_per_step": {e.side.name: e.side.steps[0]["rows"] for e in engines},
    }
    del engines, trl, runners
    gc.collect()
    return result


def summarise(
    side: Side, num_prompts: int, batch: int, flops_per_pair: float, matmul_per_token: float
) -> dict:
    ref = [s / num_prompts * batch for s in side.ref_seconds]
    prompts = sum(len(s["prompts"]) for s in side.steps)
    median = statistics.median(side.step_seconds) + statistics.median(ref)
    fastest = min(side.step_seconds) + min(ref)
    return {
        "median": median,
        "min": fastest,
        "ref": statistics.median(ref),
        "sequences": side.responses_per_prompt * batch / median,
        "prompts": batch / median,
        "real": sum(s["real"] for s in side.steps) / prompts,
        "computed": sum(s["computed"] for s in side.steps) / prompts,
        "mflop": flops_per_pair * sum(s["pairs"] for s in side.steps) / prompts / 1e6,
        # Forward FLOPs of the whole model per prompt: every computed token through the matmuls (projections,
        # MLP, output layer), plus attention.
        "gflop": (
            matmul_per_token * sum(s["computed"] for s in side.steps)
            + flops_per_pair * sum(s["pairs"] for s in side.steps)
        )
        / prompts
        / 1e9,
    }


def report(label: str, rows: int, info: dict, result: dict, args: argparse.Namespace, batch: int) -> dict:
    sides = result["sides"]
    trl = sides[-1]
    cfg = info["model_cfg"]
    from wrpo_nemo.training.outputs import model_flops_per_token

    flops_per_pair = 4 * cfg.num_layers * cfg.hidden_size
    matmul_per_token = model_flops_per_token(cfg, 0.0) / 3.0  # forward (training counts 3x)
    stats = {
        s.name: summarise(s, info["num_prompts"], batch, flops_per_pair, matmul_per_token) for s in sides
    }
    same = all(
        all(
            set(a["prompts"].tolist()) == set(b["prompts"].tolist())
            for a, b in zip(s.steps, trl.steps, strict=True)
        )
        for s in sides
    )
    print(f"\n== {label}, rows {rows} ==")
    print(
        f"prompts used: {info['num_prompts']} (of {info['records']} records written; the cache kept "
        f"{info['kept']}, dropped by length {info['dropped']}); {batch} prompts/step, {args.steps} timed steps "
        f"after {args.warmup} warm-up; same prompts at every step on all sides: {'yes' if same else 'NO'}"
    )
    rows_note = ", ".join(f"{k}: {v} x {rows}" for k, v in result["rows_per_step"].items())
    pad = [s["padded_length"] for s in trl.steps]
    print(
        f"engine rows per step: {rows_note}; TRL padded length per timed step: {pad} "
        f"({2 * batch} sequences each)"
    )
    head = (
        f"{'side':<24}{'s/step med':>11}{'min':>8}{'ref s/step':>11}{'resp-seq/s':>11}{'prompts/s':>10}"
        f"{'xTRL seq/s':>11}{'xTRL prm/s':>11}{'tok/prompt real':>16}{'computed':>10}{'attn MFLOP/prompt':>18}"
        f"{'fwd GFLOP/prompt':>17}"
    )
    print(head)
    base = stats[trl.name]
    for name, st in stats.items():
        print(
            f"{name:<24}{st['median']:>11.3f}{st['min']:>8.3f}{st['ref']:>11.3f}{st['sequences']:>11.2f}"
            f"{st['prompts']:>10.2f}{st['sequences'] / base['sequences']:>10.2f}x"
            f"{st['prompts'] / base['prompts']:>10.2f}x{st['real']:>16.0f}{st['computed']:>10.0f}{st['mflop']:>18.1f}"
            f"{st['gflop']:>17.3f}"
        )
    if result["length_mismatches"]:
        print(f"note: TRL's token counts differ from the engine's for {result['length_mismatches']} prompts")
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="ultrafeedback,toy", help="comma-separated: ultrafeedback, toy")
    parser.add_argument("--rows", default="2048,4096", help="packed row lengths for ultrafeedback-like")
    parser.add_argument("--steps", type=int, default=6, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch", type=int, default=8, help="prompts per step, ultrafeedback-like")
    parser.add_argument("--toy-batch", type=int, default=16, help="prompts per step, toy")
    parser.add_argument("--preset", default="toy", help="model preset (wrpo_nemo.models.presets)")
    parser.add_argument("--ref-rounds", type=int, default=2, help="interleaved timings of the reference pass")
    args = parser.parse_args()
    labels = [DATA_NAMES[d.strip()] for d in args.data.split(",") if d.strip()]
    rows_uf = [int(r) for r in args.rows.split(",") if r.strip()]

    torch.set_num_threads(1)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()  # e.g. "process group initialized but not ParallelMode.DISTRIBUTED"

    from wrpo_nemo.models import model_config_from_hf
    from wrpo_nemo.training.parallel import destroy_parallel, initialize_parallel

    layouts = ["shared_prompt", "separate"]
    device = initialize_parallel(1, 1, seed=0)
    import trl

    print(
        f"wrpo-nemo engine vs TRL {trl.__version__} DPOTrainer (transformers {transformers.__version__}, "
        f"torch {torch.__version__}), preset {args.preset}, fp32, {torch.get_num_threads()} CPU thread, one process"
    )
    print(f"engine layouts: {', '.join(layouts)}")
    print(
        "s/step includes the reference pass: each side's reference log-prob precompute over the prompts used "
        "was timed, divided by the number of prompts, and (that per-prompt cost x prompts per step) added "
        "to its step time"
    )
    specs = {
        UF: DataSpec(UF, 2048, 1800, rows_uf, args.batch),
        TOY: DataSpec(TOY, 64, 40, [TOY_ROWS], args.toy_batch),
    }
    all_stats: dict[tuple[str, int], dict] = {}
    notes: list[str] = []
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for label in labels:
                spec = specs[label]
                folder = Path(tmp) / label
                need = (args.warmup + args.steps) * spec.batch
                tokenizer = _tokenizer(label)
                records, written, caches = prepare_data(folder, spec, tokenizer, need)
                hf_dir = save_model(folder, tokenizer, args.preset, max(spec.rows))
                model_cfg = model_config_from_hf(hf_dir)
                for rows in spec.rows:
                    dataset = caches[rows]
                    indices = np.arange(need)
                    ctx = {
                        "spec": spec,
                        "folder": folder,
                        "records": records,
                        "hf_dir": hf_dir,
                        "model_cfg": model_cfg,
                        "tokenizer": tokenizer,
                        "device": device,
                        "dataset": dataset,
                        "indices": indices,
                        "order": step_order(dataset, indices, spec.batch),
                        "rows": rows,
                        "batch": spec.batch,
                        "pad_id": tokenizer.pad_token_id,
                    }
                    result = run_case(ctx, layouts, args)
                    info = {
                        "model_cfg": model_cfg,
                        "num_prompts": need,
                        "records": written,
                        "kept": len(dataset),
                        "dropped": dataset.report["dropped_by_length"],
                    }
                    all_stats[(label, rows)] = report(label, rows, info, result, args, spec.batch)
                    asked, used = result["padding_free"]
                    if asked and not used and not any("padding_free" in n for n in notes):
                        warned = [m for m in result["trl_warnings"] if "padding_free" in m]
                        notes.append(
                            "TRL: padding_free=True was requested; DPOTrainer set it back to False and padded "
                            f"every batch to its longest sequence (its warning: {warned[0][:110] if warned else '-'}...)"
                        )
                    if not any(n.startswith("TRL settings") for n in notes):
                        notes.append(f"TRL settings: {result['trl_settings']}")
                    notes.append(
                        f"TRL, {label} rows {rows}: its constructor's own reference precompute took "
                        f"{result['trl_constructor_ref_seconds']:.2f} s (not used; the interleaved rounds are)"
                    )
    finally:
        destroy_parallel()
    print()
    for note in notes:
        print(note)
    print(f"total wall time {time.perf_counter() - start:.0f} s")
    key = (UF, 2048) if (UF, 2048) in all_stats else next(iter(all_stats))
    stats = all_stats[key]
    trl_rate = stats["TRL DPOTrainer"]["sequences"]
    separate = stats["engine separate"]["sequences"] / trl_rate
    shared = stats["engine shared_prompt"]["sequences"] / trl_rate
    flop_ratio = stats["engine separate"]["gflop"] / stats["engine shared_prompt"]["gflop"]
    print(
        f"shared_prompt / separate response-sequences/s = {shared / separate:.2f}x; the forward FLOPs per prompt "
        f"differ by {flop_ratio:.2f}x (the bound for an equally efficient step)"
    )
    print(
        f"{key[0]}, rows {key[1]}: shared_prompt / TRL response-sequences/s = {shared:.2f}x (separate {separate:.2f}x)"
    )


if __name__ == "__main__":
    main()
