"""The Dockerfile's structure (no Docker engine runs here): pinned base, torch kept, package installed, entry."""

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def base_image() -> str:
    args = dict(a.split("=", 1) for k, a in instructions() if k == "ARG" and "=" in a)
    (base,) = [a for k, a in instructions() if k == "FROM"]
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)


def test_base_image_is_an_ngc_pytorch_release_pinned_to_a_fixed_tag_or_digest():
    image = base_image()
    assert image.startswith("nvcr.io/nvidia/pytorch:"), image
    tag = image.split(":", 1)[1]
    assert re.fullmatch(r"\d\d\.\d\d-py3(@sha256:[0-9a-f]{64})?", tag), f"not a fixed release tag: {tag}"


def test_every_pip_install_is_constrained_to_the_images_own_torch():
    runs = [a for k, a in instructions() if k == "RUN"]
    installs = [seg for r in runs for seg in r.split("&&") if "pip install" in seg]
    assert installs, "no pip install in the Dockerfile"
    # The constraint file is written from the installed torch before anything is installed.
    assert "print('torch==' + torch.__version__)" in runs[0] and "/opt/keep-torch.txt" in runs[0]
    for seg in installs:
        assert "-c /opt/keep-torch.txt" in seg, seg
        assert not re.search(r"\btorch[=<>]", seg.replace("keep-torch", "")), f"installs a pip torch: {seg}"


def test_megatron_core_pin_and_package_are_installed_and_imported_at_build_time():
    runs = " ".join(a for k, a in instructions() if k == "RUN")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "megatron-core==0.16.1" in deps
    # The dependency list is read from pyproject.toml, so the image cannot drift from it.
    assert "d['project']['dependencies']" in runs
    assert "-e ." in runs
    assert "import torch, megatron.core, wrpo_nemo" in runs
    # The build fails if the torch after the install is not the torch before it.
    assert (
        "diff <(python -c \"import torch; print('torch==' + torch.__version__)\") /opt/keep-torch.txt" in runs
    )
    assert ("SHELL", '["/bin/bash", "-o", "pipefail", "-c"]') in instructions()


def test_the_image_holds_every_folder_the_recipe_and_the_slurm_scripts_run_from():
    copied = {a.split()[0] for k, a in instructions() if k == "COPY"}
    assert {"wrpo_nemo", "recipes", "conf", "scripts", "pyproject.toml"} <= copied
    for name in ("wrpo_nemo", "recipes", "conf", "scripts"):
        assert (ROOT / name).is_dir()
    # node.sh forwards Slurm's signal with pkill: the build checks the image has it.
    assert "command -v pkill" in " ".join(a for k, a in instructions() if k == "RUN")


def test_default_command_is_the_recipe_and_the_ngc_entrypoint_is_kept():
    kinds = [k for k, _ in instructions()]
    assert "ENTRYPOINT" not in kinds, "overriding ENTRYPOINT would break `docker run IMAGE torchrun ...`"
    (cmd,) = [a for k, a in instructions() if k == "CMD"]
    assert cmd == '["python", "recipes/wrpo.py"]'
    assert (ROOT / "recipes" / "wrpo.py").is_file()
    (workdir,) = [a for k, a in instructions() if k == "WORKDIR"]
    # scripts/slurm/job.sh runs the recipe relative to this folder inside the container.
    assert (
        f'CONTAINER_WORKDIR="${{CONTAINER_WORKDIR:-{workdir}}}"'
        in (ROOT / "scripts" / "slurm" / "job.sh").read_text()
    )
