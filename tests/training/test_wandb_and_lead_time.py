"""What a run reports beyond metrics.jsonl: W&B (offline, read back from its own files) and the warning that
the preemption lead time is too short for one step plus one save.

The W&B runs are real (``wandb`` installed, ``WANDB_MODE=offline``: nothing leaves the machine, no API key);
their history is read from the ``.wandb`` file W&B writes, framed as a LevelDB log of ``wandb.proto`` records.
"""

import contextlib
import io
import json
import signal
import struct
from pathlib import Path

import pytest
import wandb  # the test extra installs it

from wrpo_nemo.pipeline import run
from wrpo_nemo.training.config import load_run_config
from wrpo_nemo.training.outputs import MetricsLogger, read_metrics
from wrpo_nemo.training.preemption import LEAD_TIME_ENV, LeadTimeCheck, lead_time_from_env

ADVICE = "raise SIGNAL_LEAD and --signal=USR1@N to at least"


def tiny_run_config(run_dir: Path, max_steps: int, project: str | None):
    """SFT only on the toy task, 8 prompts per step; evaluation and a checkpoint every 2 steps."""
    return load_run_config(
        {
            "run_dir": str(run_dir),
            "stages": ["sft"],
            "data": {
                "toy": True, "toy_examples": 200, "toy_max_operand": 9,
                "source": {"num_workers": 1, "cache_dir": str(run_dir / "cache"),
                           "tokenize": {"max_length": 64, "max_prompt_length": 40, "seq_length": 256}},
            },
            "sft": {"optim": {"lr": 1e-3}, "global_batch_size": 8, "micro_batch_size": 8,
                    "max_steps": max_steps},
            "checkpoint": {"save_interval": 2, "keep_last": 10, "resume": True},
            "logging": {"log_interval": 100, "eval_interval": 2, "eval_prompts": 8, "tensorboard": False,
                        "plots": False, "wandb_project": project},
            "export": {"hf": False},
        }
    )  # fmt: skip


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline, its files and settings in tmp_path, no credentials anywhere, and a server address that
    refuses connections: offline mode must not need one."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    (tmp_path / "wandb_dir").mkdir()
    yield tmp_path / "wandb_dir"
    with contextlib.suppress(Exception):  # a test that killed W&B's service leaves a broken connection
        wandb.teardown()


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def wandb_records(path: Path):
    """The ``wandb.proto`` records of a ``.wandb`` file: a 7-byte header (":W&B", magic, version), then 32 KiB
    blocks of chunks (crc32, length, type: full/first/middle/last), a block's tail under 7 bytes left zero."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (kind == 0 and length == 0):
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wandb_history(run_folder: Path) -> tuple[list[dict], dict]:
    """The rows a W&B run logged (W&B's own ``_``-keys left out) and its config."""
    (path,) = run_folder.glob("run-*.wandb")
    rows, config = [], {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            rows.append({k: v for k, v in items.items() if not k.startswith("_")})
        elif kind == "run":
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
    return rows, config


def offline_runs(wandb_dir: Path, run_id: str) -> list[Path]:
    """The offline folders of one W&B run, oldest first: ``offline-run-<start second>-<id>``, with ``-1``, ``-2``
    ... appended by W&B when a later one starts within the same second."""
    return sorted((wandb_dir / "wandb").glob(f"offline-run-*-{run_id}*"))


def as_wandb_rows(records: list[dict]) -> list[dict]:
    """metrics.jsonl records as MetricsLogger hands them to W&B."""
    return [
        {f"{r['stage']}/step": r["step"]}
        | {f"{r['stage']}/{r['split']}/{k}": v for k, v in r.items() if k not in ("stage", "split", "step")}
        for r in records
    ]


def test_an_offline_wandb_run_holds_every_metrics_record_and_a_resume_continues_it(tmp_path, offline_wandb):
    run_dir = tmp_path / "run"
    run(tiny_run_config(run_dir, max_steps=4, project="wrpo-test"))
    run_id = (run_dir / "sft" / "wandb_run_id").read_text().strip()
    (first,) = offline_runs(offline_wandb, run_id)
    rows, config = wandb_history(first)
    records = read_metrics(run_dir / "sft" / "metrics.jsonl")
    assert {r["split"] for r in records} == {"train", "eval", "checkpoint"}
    assert rows == as_wandb_rows(records)
    assert config["run_dir"] == str(run_dir) and config["sft"]["max_steps"] == 4

    # A longer plan resumes from step 4: the same W&B run (its id kept in the stage folder) goes on.
    run(tiny_run_config(run_dir, max_steps=6, project="wrpo-test"))
    assert (run_dir / "sft" / "wandb_run_id").read_text().strip() == run_id
    folders = offline_runs(offline_wandb, run_id)
    assert len(folders) == 2 and folders[0] == first
    resumed_rows, _ = wandb_history(folders[1])
    records = read_metrics(run_dir / "sft" / "metrics.jsonl")
    assert rows + resumed_rows == as_wandb_rows(records)
    assert max(r["step"] for r in records) == 6


def test_wandb_failing_mid_run_stops_wandb_only(tmp_path, offline_wandb, capsys):
    """Slurm's SIGTERM to every process of a preempted step kills W&B's service too; the trainer, saving its
    checkpoint, must not die of the broken connection."""
    import psutil

    logger = MetricsLogger(
        tmp_path / "sft", "sft", 4, enabled=True, log_interval=100, tensorboard=False,
        wandb_project="wrpo-test", run_name="run",
    )  # fmt: skip
    logger.log(1, {"loss": 0.5})
    (service,) = [p for p in psutil.Process().children() if p.name().startswith("wandb-core")]
    service.terminate()
    service.wait(timeout=30)
    logger.log(2, {"loss": 0.4})
    logger.log(2, {"checkpoint_save_s": 1.5}, split="checkpoint")
    logger.close()
    assert [(r["split"], r["step"]) for r in read_metrics(tmp_path / "sft" / "metrics.jsonl")] == [
        ("train", 1), ("train", 2), ("checkpoint", 2),
    ]  # fmt: skip
    assert capsys.readouterr().err.count("warning: W&B stopped") == 1


def test_lead_time_from_the_launcher(monkeypatch):
    for value, expected in (("120", 120.0), ("300.5", 300.5), ("", None), ("0", None), ("-5", None),
                            ("2min", None), ("nan", None), ("inf", None)):  # fmt: skip
        monkeypatch.setenv(LEAD_TIME_ENV, value)
        assert lead_time_from_env() == expected, value
    monkeypatch.delenv(LEAD_TIME_ENV)
    assert lead_time_from_env() is None


def test_lead_time_warning_comes_once_when_the_longest_step_plus_the_longest_save_exceed_it():
    check = LeadTimeCheck(120.0)
    assert check.observe(step_s=30.0) is None
    assert check.observe(save_s=80.0) is None  # 30 + 80 fits
    assert check.observe(step_s=20.0) is None  # shorter steps change nothing
    warning = check.observe(step_s=45.0)  # 45 + 80 does not
    assert warning is not None and f"{ADVICE} 157" in warning  # ceil(125 x 1.25)
    assert (
        "45.0 s" in warning and "80.0 s" in warning and "SIGNAL_LEAD=157 sbatch --signal=USR1@157" in warning
    )
    assert check.observe(step_s=100.0, save_s=100.0) is None  # once
    assert LeadTimeCheck(None).observe(step_s=1e6, save_s=1e6) is None  # not under the Slurm launcher
    assert LeadTimeCheck(10.0).observe(step_s=11.0) is not None  # a step alone can exceed it


def test_a_run_warns_once_on_rank_0_when_its_lead_time_is_too_short(tmp_path, monkeypatch):
    monkeypatch.setenv(LEAD_TIME_ENV, "0.001")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        run(tiny_run_config(tmp_path / "run", max_steps=3, project=None))
    assert stderr.getvalue().count(ADVICE) == 1
    (line,) = [x for x in stderr.getvalue().splitlines() if ADVICE in x]
    assert line.startswith("[sft] warning: the preemption lead time (WRPO_SIGNAL_LEAD_S=0.001 s)")
    monkeypatch.setenv(LEAD_TIME_ENV, "100000")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        run(tiny_run_config(tmp_path / "run2", max_steps=3, project=None))
    assert ADVICE not in stderr.getvalue()
