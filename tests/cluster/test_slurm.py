"""The Slurm scripts, run by bash with a fake Slurm: the exact commands, the requeue decision, signal forwarding.

``scontrol`` and ``srun`` are small fakes on PATH that record their arguments (``srun`` its environment too:
what the trainers inherit); the fake ``srun`` can also play a trainer that was preempted (it writes
summary.json as the recipe does) or one that crashed.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SLURM = ROOT / "scripts" / "slurm"
HOSTS = ["gpu-a017", "gpu-a018", "gpu-a019", "gpu-a020"]

FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_CALLS"
if [[ "$1 $2" == "show hostnames" ]]; then printf '%s\\n' $FAKE_HOSTS; fi
"""
FAKE_SRUN = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$FAKE_SRUN_ARGS"
env > "$FAKE_SRUN_ENV"
case "$FAKE_TRAINER" in
  preempted) echo '{"sft": {"steps": 7, "preempted": true}}' > "$RUN_DIR/summary.json" ;;
  done) echo '{"sft": {"steps": 9, "preempted": false}}' > "$RUN_DIR/summary.json" ;;
  crash) exit 3 ;;
esac
"""


@pytest.fixture
def slurm(tmp_path):
    """Run an sbatch script as Slurm's batch step would, with fake scontrol/srun on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)

    def run(script: str, *args: str, nodes: int = 1, **env: str) -> subprocess.CompletedProcess:
        full_env = {
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "HOME": str(tmp_path),
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NAME": "wrpo-test",
            "SLURM_JOB_NUM_NODES": str(nodes),
            "SLURM_JOB_NODELIST": "gpu-a[017-020]",
            "SLURM_GPUS_ON_NODE": "8",
            "SLURM_CPUS_ON_NODE": "64",
            "SLURM_JOB_CPUS_PER_NODE": f"64(x{nodes})",
            "SLURM_SUBMIT_DIR": str(ROOT),
            "CONTAINER_IMAGE": "/images/wrpo-nemo.sqsh",
            "RUN_DIR": str(tmp_path / "run"),
            "LOG_ROOT": str(tmp_path / "logs"),
            "FAKE_HOSTS": " ".join(HOSTS[:nodes]),
            "FAKE_CALLS": str(tmp_path / "calls.txt"),
            "FAKE_SRUN_ARGS": str(tmp_path / "srun_args.txt"),
            "FAKE_SRUN_ENV": str(tmp_path / "srun_env.txt"),
            "FAKE_TRAINER": "none",
            **env,
        }
        return subprocess.run(
            ["bash", str(SLURM / script), *args], env=full_env, capture_output=True, text=True, timeout=60
        )

    return run


def expected_srun(tmp_path: Path, nodes: int, restart: int, *recipe_args: str, cpus: int = 64) -> list[str]:
    run_dir, log_dir = tmp_path / "run", tmp_path / "logs" / "wrpo-test-4242"
    return [
        "srun", f"--nodes={nodes}", "--ntasks-per-node=1", f"--cpus-per-task={cpus}", "--kill-on-bad-exit=1",
        "--container-image=/images/wrpo-nemo.sqsh", f"--container-mounts={tmp_path}:{tmp_path},{log_dir}:{log_dir}",
        "--container-workdir=/workspace/wrpo-nemo", f"--output={log_dir}/restart{restart}-node%n.log",
        "bash", "scripts/slurm/node.sh", str(log_dir),
        "torchrun", "--signals-to-handle=SIGINT,SIGHUP,SIGQUIT", f"--nnodes={nodes}", "--nproc-per-node=8", "--rdzv-backend=c10d",
        f"--rdzv-endpoint=gpu-a017:{20000 + 4242}", f"--rdzv-id=4242-{restart}",
        "recipes/wrpo.py", *recipe_args, f"run_dir={run_dir}", "checkpoint.resume=true",
    ]  # fmt: skip


def sbatch_options(script: str) -> dict[str, str]:
    lines = [
        x[len("#SBATCH ") :] for x in (SLURM / script).read_text().splitlines() if x.startswith("#SBATCH ")
    ]
    return dict(x.lstrip("-").split("=", 1) if "=" in x else (x.lstrip("-"), "") for x in lines)


def test_dry_run_prints_the_exact_one_node_command_and_runs_nothing(slurm, tmp_path):
    args = [
        "--config-name",
        "wrpo_llama3_8b",
        "model.checkpoint=/models/sft",
        "data.source.sources=[a.jsonl,b]",
    ]
    out = slurm("wrpo_1node.sbatch", *args, DRY_RUN="1")
    assert out.returncode == 0, out.stderr
    printed = [shlex.split(line) for line in out.stdout.splitlines() if line.startswith("srun ")]
    assert printed == [expected_srun(tmp_path, 1, 0, *args)]
    assert not (tmp_path / "srun_args.txt").exists(), "dry run started srun"
    log_dir = tmp_path / "logs" / "wrpo-test-4242"
    assert shlex.split((log_dir / "commands.txt").read_text()) == expected_srun(tmp_path, 1, 0, *args)
    env_dump = (log_dir / "restart0.env").read_text()
    assert "CUDA_DEVICE_MAX_CONNECTIONS=1" in env_dump and "TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in env_dump


def test_multinode_rendezvous_is_on_the_first_node_with_one_torchrun_per_node(slurm, tmp_path):
    out = slurm("wrpo_multinode.sbatch", "--config-name", "wrpo_llama3_70b", nodes=4, DRY_RUN="1",
                SLURM_RESTART_COUNT="2")  # fmt: skip
    assert out.returncode == 0, out.stderr
    (line,) = [line for line in out.stdout.splitlines() if line.startswith("srun ")]
    assert shlex.split(line) == expected_srun(tmp_path, 4, 2, "--config-name", "wrpo_llama3_70b")
    assert "scontrol show hostnames gpu-a[017-020]" in (tmp_path / "calls.txt").read_text()


def test_extra_mounts_and_the_checkout_are_mounted_only_when_asked(slurm, tmp_path):
    out = slurm("wrpo_1node.sbatch", DRY_RUN="1", EXTRA_MOUNTS="/shared/models:/models", MOUNT_REPO="1")
    (line,) = [shlex.split(x) for x in out.stdout.splitlines() if x.startswith("srun ")]
    (mounts,) = [x.split("=", 1)[1].split(",") for x in line if x.startswith("--container-mounts=")]
    assert mounts[2:] == ["/shared/models:/models", f"{ROOT}:/workspace/wrpo-nemo"]


def test_sbatch_headers_request_the_warning_signal_requeue_and_whole_nodes():
    for script, nodes in (("wrpo_1node.sbatch", "1"), ("wrpo_multinode.sbatch", "4")):
        opts = sbatch_options(script)
        assert opts["nodes"] == nodes and opts["gpus-per-node"] == "8" and opts["ntasks-per-node"] == "1"
        # Without "B:" Slurm signals the job step's tasks (node.sh), not only the batch shell.
        assert opts["signal"].startswith("USR1@") and int(opts["signal"].split("@")[1]) >= 120
        assert "requeue" in opts and opts["open-mode"] == "append" and "exclusive" in opts
        # The one task per node takes the whole node's CPUs from the allocation, not a fixed count that a node
        # with fewer CPUs could not grant (or that would leave most of a larger node idle).
        assert "cpus-per-task" not in opts


def srun_env(tmp_path: Path) -> dict[str, str]:
    """The environment the fake srun (standing for the trainers) ran with."""
    lines = (tmp_path / "srun_env.txt").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def dumped_env(tmp_path: Path, restart: int = 0) -> dict[str, str]:
    text = (tmp_path / "logs" / "wrpo-test-4242" / f"restart{restart}.env").read_text()
    return dict(line.split("=", 1) for line in text.splitlines())


def assert_nccl_ib_settings_fit_their_fields(env: dict[str, str]) -> None:
    """NCCL_IB_RETRY_CNT is a 3-bit InfiniBand queue-pair field (0-7, NCCL's default 7); NCCL_IB_TIMEOUT the
    5-bit Local Ack Timeout exponent (NCCL accepts 1-31)."""
    assert 0 <= int(env["NCCL_IB_RETRY_CNT"]) <= 7, env["NCCL_IB_RETRY_CNT"]
    assert 1 <= int(env["NCCL_IB_TIMEOUT"]) <= 31, env["NCCL_IB_TIMEOUT"]


@pytest.mark.parametrize("script", ["wrpo_1node.sbatch", "wrpo_multinode.sbatch"])
def test_nccl_infiniband_settings_given_to_the_trainers_fit_their_fields(slurm, tmp_path, script):
    out = slurm(script, FAKE_TRAINER="done")
    assert out.returncode == 0, out.stderr
    assert_nccl_ib_settings_fit_their_fields(dumped_env(tmp_path))
    assert_nccl_ib_settings_fit_their_fields(srun_env(tmp_path))
    # A site's own values within the fields are kept.
    out = slurm(script, FAKE_TRAINER="done", NCCL_IB_RETRY_CNT="5", NCCL_IB_TIMEOUT="20")
    assert out.returncode == 0, out.stderr
    assert (srun_env(tmp_path)["NCCL_IB_RETRY_CNT"], srun_env(tmp_path)["NCCL_IB_TIMEOUT"]) == ("5", "20")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("NCCL_IB_RETRY_CNT", "13"),
        ("NCCL_IB_RETRY_CNT", "-1"),
        ("NCCL_IB_TIMEOUT", "32"),
        ("NCCL_IB_TIMEOUT", "x"),
    ],
)
def test_an_infiniband_setting_outside_its_field_is_refused(slurm, tmp_path, name, value):
    out = slurm("wrpo_1node.sbatch", FAKE_TRAINER="done", **{name: value})
    assert out.returncode == 2 and f"{name}={value} is outside" in out.stderr
    assert not (tmp_path / "srun_args.txt").exists()


@pytest.mark.parametrize(
    ("nodes", "allocation", "cpus"),
    [
        (1, {}, 64),  # --exclusive: every CPU of the node (SLURM_JOB_CPUS_PER_NODE)
        (4, {"SLURM_JOB_CPUS_PER_NODE": "112(x3),96"}, 96),  # the smallest node of a mixed allocation
        (1, {"SLURM_JOB_CPUS_PER_NODE": "", "SLURM_CPUS_ON_NODE": "128"}, 128),
        (4, {"SLURM_CPUS_PER_TASK": "48"}, 48),  # sbatch --cpus-per-task=48
        (1, {"SLURM_CPUS_PER_TASK": "48", "CPUS_PER_TASK": "32"}, 32),
    ],
)
def test_srun_gets_the_allocations_cpus_per_task_explicitly(slurm, tmp_path, nodes, allocation, cpus):
    # Since Slurm 22.05 srun does not inherit sbatch's --cpus-per-task: without the flag the node's one task,
    # torchrun with its 8 trainers, would be bound to a single CPU.
    script = "wrpo_1node.sbatch" if nodes == 1 else "wrpo_multinode.sbatch"
    out = slurm(script, "stages=[sft]", nodes=nodes, FAKE_TRAINER="done", **allocation)
    assert out.returncode == 0, out.stderr
    srun_args = (tmp_path / "srun_args.txt").read_text().split("\n")[:-1]
    assert ["srun", *srun_args] == expected_srun(tmp_path, nodes, 0, "stages=[sft]", cpus=cpus)
    assert srun_env(tmp_path)["OMP_NUM_THREADS"] == str(cpus // 8)  # the node's CPUs shared by its trainers


def test_no_cpu_count_in_the_environment_is_refused(slurm, tmp_path):
    out = slurm("wrpo_1node.sbatch", SLURM_JOB_CPUS_PER_NODE="", SLURM_CPUS_ON_NODE="")
    assert out.returncode == 2 and "CPUS_PER_TASK" in out.stderr
    assert not (tmp_path / "srun_args.txt").exists()


@pytest.mark.parametrize("script", ["wrpo_1node.sbatch", "wrpo_multinode.sbatch"])
def test_the_signal_lead_time_reaches_the_trainers_and_defaults_to_the_headers(slurm, tmp_path, script):
    header_lead = sbatch_options(script)["signal"].split("@")[1]
    out = slurm(script, FAKE_TRAINER="done")
    assert out.returncode == 0, out.stderr
    assert srun_env(tmp_path)["WRPO_SIGNAL_LEAD_S"] == header_lead
    assert dumped_env(tmp_path)["WRPO_SIGNAL_LEAD_S"] == header_lead
    # sbatch --signal=USR1@600 on the command line comes with SIGNAL_LEAD=600.
    out = slurm(script, FAKE_TRAINER="done", SIGNAL_LEAD="600")
    assert out.returncode == 0, out.stderr
    assert srun_env(tmp_path)["WRPO_SIGNAL_LEAD_S"] == "600"
    out = slurm(script, FAKE_TRAINER="done", SIGNAL_LEAD="10min")
    assert out.returncode == 2 and "SIGNAL_LEAD=10min" in out.stderr


@pytest.mark.parametrize(
    ("image", "portable"),
    [
        ("nvcr.io/nvidia/pytorch:25.11-py3", "nvcr.io#nvidia/pytorch:25.11-py3"),
        ("registry.example.com:5000/ml/wrpo-nemo:1.0", "registry.example.com:5000#ml/wrpo-nemo:1.0"),
        ("localhost/wrpo-nemo", "localhost#wrpo-nemo"),
        ("nvcr.io#nvidia/pytorch:25.11-py3", None),  # the form every enroot reads
        ("/shared/images/wrpo-nemo.sqsh", None),  # a local squashfs file
        ("images/wrpo-nemo.sqsh", None),
        ("nvidia/cuda:12.8.0-base-ubuntu24.04", None),  # Docker Hub: no registry host to spell
        ("ubuntu:24.04", None),
    ],
)
def test_a_slash_registry_image_gets_a_warning_naming_its_portable_form(slurm, tmp_path, image, portable):
    out = slurm("wrpo_1node.sbatch", DRY_RUN="1", CONTAINER_IMAGE=image)
    assert out.returncode == 0, out.stderr
    (line,) = [shlex.split(x) for x in out.stdout.splitlines() if x.startswith("srun ")]
    assert f"--container-image={image}" in line  # passed on as given: the warning only advises
    if portable is None:
        assert "warning" not in out.stderr
    else:
        assert "enroot before 4.0" in out.stderr and f"CONTAINER_IMAGE={portable}" in out.stderr


def test_a_preempted_run_requeues_the_job_and_a_finished_one_does_not(slurm, tmp_path):
    out = slurm("wrpo_1node.sbatch", "stages=[sft]", FAKE_TRAINER="preempted", SLURM_RESTART_COUNT="1")
    assert out.returncode == 0, out.stderr
    srun_args = (tmp_path / "srun_args.txt").read_text().split("\n")[:-1]
    assert ["srun", *srun_args] == expected_srun(tmp_path, 1, 1, "stages=[sft]")
    assert "scontrol requeue 4242" in (tmp_path / "calls.txt").read_text()
    (tmp_path / "calls.txt").unlink()
    out = slurm("wrpo_1node.sbatch", "stages=[sft]", FAKE_TRAINER="done", SLURM_RESTART_COUNT="2")
    assert out.returncode == 0, out.stderr
    assert "requeue" not in (tmp_path / "calls.txt").read_text()
    assert "finished" in out.stdout


def test_a_stale_preempted_summary_or_a_crash_never_requeues(slurm, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps({"sft": {"preempted": True}}))
    old = time.time() - 3600
    os.utime(run_dir / "summary.json", (old, old))
    out = slurm("wrpo_1node.sbatch", FAKE_TRAINER="none")
    assert out.returncode == 0 and "requeue" not in (tmp_path / "calls.txt").read_text()
    out = slurm("wrpo_1node.sbatch", FAKE_TRAINER="crash")
    assert out.returncode == 3 and "requeue" not in (tmp_path / "calls.txt").read_text()


def test_requeues_stop_after_max_restarts(slurm, tmp_path):
    out = slurm("wrpo_1node.sbatch", FAKE_TRAINER="preempted", SLURM_RESTART_COUNT="5", MAX_RESTARTS="5")
    assert out.returncode == 1 and "MAX_RESTARTS" in out.stderr
    assert "requeue" not in (tmp_path / "calls.txt").read_text()


FAKE_TORCHRUN = """
import signal, subprocess, sys
# Like the recipe: the signal sets a flag, the loop stops at the next step boundary and exits 0.
trainer = "import signal, sys, time\\n" \\
    "got = []\\n" \\
    "signal.signal(signal.SIGUSR1, lambda sig, frame: got.append(signal.Signals(sig).name))\\n" \\
    "open(sys.argv[1] + '.ready', 'w').close()\\n" \\
    "for step in range(600):\\n" \\
    "    time.sleep(0.1)\\n" \\
    "    if got:\\n" \\
    "        open(sys.argv[1], 'w').write(got[0])\\n" \\
    "        sys.exit(0)\\n" \\
    "sys.exit(5)\\n"
# Like torchrun: SIGUSR1 would kill this launcher, so only its child (the trainer) may receive it.
child = subprocess.Popen([sys.executable, "-c", trainer, sys.argv[1]])
sys.exit(child.wait())
"""


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
@pytest.mark.parametrize("whole_step", [False, True], ids=["task-only", "every-process-of-the-step"])
def test_node_wrapper_gets_slurms_signal_to_the_trainers_and_exits_with_their_status(
    tmp_path, whole_step, sig
):
    marker = tmp_path / "trainer.signal"
    cmd = ["bash", str(SLURM / "node.sh"), str(tmp_path), sys.executable, "-c", FAKE_TORCHRUN, str(marker)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.time() + 30
    while not Path(f"{marker}.ready").exists():
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    # Slurm signals the task (proctrack/pgid) or every process of the step, torchrun included (cgroup).
    # A SIGTERM reaching the (fake) torchrun is ignored: it would otherwise end it before the trainers exit.
    if whole_step:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert marker.read_text() == "SIGUSR1"
    assert "asking the trainers to save and stop" in stderr
    assert (tmp_path / "torchrun-node0.pid").read_text().strip().isdigit()
