"""The Dockerfile, read as Docker reads it (no Docker engine runs here): what the image would hold and run.

A small parser turns it into instructions (continuation lines joined, comments dropped, ``ARG`` defaults
substituted, exec-form JSON decoded) and each ``RUN`` into the shell commands ``&&`` chains; the tests check
properties of that build: the base image is a fixed release, the pins are the project's, no pip call can
replace the image's CUDA torch, the files the recipe and the Slurm scripts need are copied to the working
directory they run from, and the container starts the recipe through the image's own entry point. The Python
the build runs to write its pip inputs is run here too, on a copy of what the image holds at that point.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from wrpo_nemo import compat

ROOT = Path(__file__).resolve().parents[2]
PROVIDED_BY_THE_IMAGE = {"torch", "transformer-engine", "transformer-engine-torch", "apex", "flash-attn"}
"""CUDA builds the NGC image carries, matched to its CUDA: never to be installed from PyPI over it."""


@dataclass
class Instruction:
    keyword: str
    value: str
    line: int

    @property
    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form ``CMD``/``ENTRYPOINT``/``SHELL``/``RUN``, else ``None``."""
        try:
            parsed = json.loads(self.value)
        except json.JSONDecodeError:
            return None
        return parsed if isinstance(parsed, list) and all(isinstance(x, str) for x in parsed) else None


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order. A line ending in ``\\`` continues on the next; comment and empty lines are dropped,
    also inside a continued instruction, as Docker does."""
    out, parts, start = [], [], 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not parts:
            start = number
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        parts.append(stripped)
        keyword, _, value = " ".join(p for p in parts if p).partition(" ")
        out.append(Instruction(keyword.upper(), value.strip(), start))
        parts = []
    assert not parts, "the Dockerfile ends inside a continued instruction"
    return out


def substitute(value: str, variables: dict[str, str]) -> str:
    """``$NAME``, ``${NAME}`` and ``${NAME:-default}`` as the Dockerfile's ARG/ENV values define them."""

    def one(match: re.Match) -> str:
        name = match.group(1) or match.group(3)
        if name not in variables and match.group(2) is None:
            raise AssertionError(f"${name} is not defined before it is used")
        return variables.get(name, match.group(2))

    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", one, value)


def key_values(value: str) -> dict[str, str]:
    """``ENV``/``ARG`` pairs: ``A=1 B="two words"`` (or the legacy ``A 1``)."""
    words = shlex.split(value)
    if len(words) >= 2 and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(w.split("=", 1) if "=" in w else (w, "") for w in words)


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell-form ``RUN`` (split at ``&&``, ``||``, ``;`` and ``|``), as argv lists;
    a redirection stays a word of its command (``>``, ``FILE``)."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|<>()")
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in ("&&", "||", ";", "|"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    return [c for c in commands if c]


@dataclass
class PipInstall:
    constraints: list[str]
    requirement_files: list[str]
    editable: list[str]
    packages: list[str]
    no_deps: bool


def pip_install(argv: list[str]) -> PipInstall | None:
    """The parsed options of a ``pip install`` / ``python -m pip install`` command, else ``None``."""
    words = list(argv)
    if words[:3] in (["python", "-m", "pip"], ["python3", "-m", "pip"]):
        words = words[2:]
    if words[:2] != ["pip", "install"]:
        return None
    parsed = PipInstall([], [], [], [], False)
    rest = iter(words[2:])
    for word in rest:
        if word in ("-c", "--constraint"):
            parsed.constraints.append(next(rest))
        elif word in ("-r", "--requirement"):
            parsed.requirement_files.append(next(rest))
        elif word in ("-e", "--editable"):
            parsed.editable.append(next(rest))
        elif word == "--no-deps":
            parsed.no_deps = True
        elif word.startswith("-"):
            assert word in ("--no-cache-dir", "-q", "--quiet", "-U", "--upgrade"), (
                f"unexpected pip option {word}"
            )
        else:
            parsed.packages.append(word)
    return parsed


class Build:
    """The Dockerfile's instructions with ARG defaults and ENV values substituted."""

    def __init__(self, text: str) -> None:
        self.instructions = parse_dockerfile(text)
        variables: dict[str, str] = {}
        self.resolved: list[Instruction] = []
        for ins in self.instructions:
            value = ins.value
            if ins.keyword in ("ARG", "ENV"):
                pairs = {k: substitute(v, variables) for k, v in key_values(value).items()}
                variables.update(pairs)
            elif ins.keyword in ("FROM", "WORKDIR", "COPY"):
                value = substitute(value, variables)
            self.resolved.append(Instruction(ins.keyword, value, ins.line))

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.resolved if i.keyword == keyword]

    def one(self, keyword: str) -> Instruction:
        (found,) = self.all(keyword)
        return found

    def commands(self) -> list[tuple[Instruction, list[str]]]:
        """Every simple command of every ``RUN`` in build order, with its instruction."""
        return [(ins, argv) for ins in self.all("RUN") for argv in shell_commands(ins.value)]

    def workdir(self) -> PurePosixPath:
        return PurePosixPath(self.one("WORKDIR").value)

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for ins in self.all("ENV"):
            env.update(key_values(ins.value))
        return env


BUILD = Build((ROOT / "Dockerfile").read_text())


def stage_image(tmp_path: Path, upto_line: int | None = None) -> Path:
    """The image's working directory as the COPY instructions (those before ``upto_line``) fill it from this
    checkout, in a new folder under ``tmp_path``; returns it."""
    workdir = Path(tempfile.mkdtemp(dir=tmp_path)) / BUILD.workdir().relative_to("/")
    workdir.mkdir(parents=True)
    for ins in BUILD.all("COPY"):
        if upto_line is not None and ins.line > upto_line:
            break
        *sources, target = shlex.split(ins.value)
        assert not any(s.startswith("--") for s in sources), f"COPY option not modelled: {ins.value}"
        target_path = workdir / PurePosixPath(target)
        for source in sources:
            src = ROOT / source
            assert src.exists(), f"line {ins.line}: COPY {source}: no such file in the build context"
            if src.is_dir():
                into = (
                    target_path if len(sources) == 1 and not target.endswith("/") else target_path / src.name
                )
                shutil.copytree(src, into, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                dest_file = target_path / src.name if target.endswith("/") else target_path
                dest_file.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest_file)
    return workdir


def python_snippet(argv: list[str]) -> str | None:
    """The code of a ``python -c CODE`` command."""
    if argv[:2] in (["python", "-c"], ["python3", "-c"]):
        return argv[2]
    return None


def redirect_target(argv: list[str]) -> str | None:
    return argv[argv.index(">") + 1] if ">" in argv else None


def written_by_the_build(path: str, tmp_path: Path) -> str:
    """What the build's ``python -c CODE > path`` writes: the code run here, in the image's working directory
    as the COPY instructions before that RUN leave it."""
    for ins, argv in BUILD.commands():
        if redirect_target(argv) == path and (code := python_snippet(argv)):
            out = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                cwd=stage_image(tmp_path, ins.line),
            )  # fmt: skip
            assert out.returncode == 0, f"line {ins.line}: {out.stderr}"
            return out.stdout
    raise AssertionError(f"no RUN writes {path} with python -c")


def project_pins() -> dict[str, str]:
    """``name -> version`` of requirements/cpu.txt (the environment the tests run in)."""
    pins = {}
    for line in (ROOT / "requirements" / "cpu.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            pins[canonicalize_name(req.name)] = spec.version
    return pins


@pytest.fixture(scope="module")
def torch_constraint(tmp_path_factory) -> str:
    """The file the build writes from the image's own torch before anything is installed; its content, made
    here, must pin exactly the torch installed here."""
    import torch

    tmp_path = tmp_path_factory.mktemp("constraint")
    for _, argv in BUILD.commands():
        code, target = python_snippet(argv), redirect_target(argv)
        if code and target and "torch.__version__" in code:
            (req,) = [Requirement(line) for line in written_by_the_build(target, tmp_path).split()]
            assert req.name == "torch" and str(req.specifier) == f"=={torch.__version__}", req
            return target
    raise AssertionError("no RUN writes the image's torch version to a constraint file")


def imported_modules(code: str) -> set[str]:
    """The modules a snippet of Python imports."""
    found = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def names(lines: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(line).name) for line in lines if line.strip()}


def test_base_image_is_an_ngc_pytorch_release_pinned_to_a_fixed_tag_or_digest():
    (ins,) = [i for i in BUILD.resolved if i.keyword == "FROM"]
    image = ins.value.split()[0]
    name, _, tag = image.partition(":")
    assert name == "nvcr.io/nvidia/pytorch", image
    # A monthly release (25.11-py3), optionally with its digest; never latest or a floating devel tag.
    assert re.fullmatch(r"\d\d\.\d\d-py3(@sha256:[0-9a-f]{64})?", tag), f"not a fixed release tag: {image}"


def test_no_pip_call_can_replace_the_images_torch_or_its_cuda_libraries(torch_constraint, tmp_path):
    constraint = torch_constraint
    installs = [(ins, pip) for ins, argv in BUILD.commands() if (pip := pip_install(argv))]
    assert installs, "the Dockerfile installs nothing"
    writer = next(ins.line for ins, argv in BUILD.commands() if redirect_target(argv) == constraint)
    assert writer <= min(ins.line for ins, _ in installs), (
        "the torch constraint is written after a pip install"
    )
    for ins, pip in installs:
        # Every pip call is held to the image's torch, even one without dependencies.
        assert constraint in pip.constraints, f"line {ins.line}: pip install without -c {constraint}"
        assert not names(pip.packages) & PROVIDED_BY_THE_IMAGE, f"line {ins.line}: {pip.packages}"
        for req_file in pip.requirement_files:
            # Of the image's own packages, only torch may be listed (held by the constraint).
            listed = names(written_by_the_build(req_file, tmp_path).splitlines())
            assert listed & PROVIDED_BY_THE_IMAGE <= {"torch"}, f"line {ins.line}: {req_file} lists {listed}"


def test_the_image_installs_the_projects_dependencies_at_the_projects_pins(tmp_path):
    (pip,) = [pip for _, argv in BUILD.commands() if (pip := pip_install(argv)) and pip.requirement_files]
    (req_file,) = pip.requirement_files
    listed = written_by_the_build(req_file, tmp_path).splitlines()
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert listed == declared, "the image's dependency list is not pyproject.toml's"
    pins = project_pins()
    for line in listed:
        req = Requirement(line)
        # Each range admits the version the CPU environment is resolved and tested with.
        assert pins[canonicalize_name(req.name)] in req.specifier, (line, pins[canonicalize_name(req.name)])
    (megatron,) = [
        Requirement(r) for r in listed if canonicalize_name(Requirement(r).name) == "megatron-core"
    ]
    (exact,) = megatron.specifier
    assert exact.operator == "==" and exact.version == pins["megatron-core"], "megatron-core must be pinned"
    compat.check_megatron(exact.version)  # one the package's compatibility layer supports
    # The GPU check's offline wheels carry the same megatron-core.
    assert (
        f"megatron-core=={exact.version}"
        in (ROOT / "scripts" / "gpu" / "prepare_wheels.sh").read_text().split()
    )


def test_the_package_is_installed_from_the_copied_source_without_resolving_again(torch_constraint, tmp_path):
    installs = [(ins, pip) for ins, argv in BUILD.commands() if (pip := pip_install(argv)) and pip.editable]
    assert len(installs) == 1
    ins, pip = installs[0]
    assert pip.no_deps, "the package's install must not resolve dependencies a second time"
    assert pip.editable == ["."]
    staged = stage_image(tmp_path, ins.line)
    # What setuptools needs to build it is in the image at that point: the metadata and the whole package.
    assert (staged / "pyproject.toml").is_file() and (staged / "README.md").is_file()
    source = sorted(p.relative_to(ROOT) for p in (ROOT / "wrpo_nemo").rglob("*.py"))
    assert source and all((staged / p).is_file() for p in source)
    # The build proves the install: it imports torch, megatron-core and the package, then compares torch.
    later = [argv for i, argv in BUILD.commands() if i.line >= ins.line]
    imported = set().union(*(imported_modules(python_snippet(a)) for a in later if python_snippet(a)))
    assert {"torch", "megatron.core", "wrpo_nemo"} <= imported, imported
    assert any(a[0] == "diff" and torch_constraint in a for a in later), (
        "torch is not compared after the install"
    )
    # diff <(...) needs bash, and a failure inside a pipe must fail the build.
    shell = BUILD.one("SHELL")
    assert shell.exec_form[:1] == ["/bin/bash"] and "pipefail" in shell.exec_form
    assert shell.line < ins.line


def test_the_container_runs_the_recipe_from_the_working_directory_the_slurm_scripts_use(tmp_path):
    workdir = str(BUILD.workdir())
    job = (ROOT / "scripts" / "slurm" / "job.sh").read_text()
    (default,) = re.findall(r'CONTAINER_WORKDIR="\$\{CONTAINER_WORKDIR:-([^}]*)\}"', job)
    assert workdir == default, "the Slurm job runs in another folder than the image's WORKDIR"
    image = stage_image(tmp_path)
    # Everything run inside the container, relative to that folder, is in the image.
    cmd = BUILD.one("CMD").exec_form
    assert cmd is not None, "CMD in shell form would run under /bin/sh -c and not receive signals"
    assert cmd[0] == "python" and (image / cmd[1]).is_file() and cmd[1] == "recipes/wrpo.py"
    (config_name,) = re.findall(
        r'CONFIG_PATH, CONFIG_NAME = "[^"]*", "(\w+)"', (ROOT / "recipes" / "wrpo.py").read_text()
    )
    assert (image / "conf" / f"{config_name}.yaml").is_file()
    assert (image / "scripts" / "slurm" / "node.sh").is_file() and "scripts/slurm/node.sh" in job
    node = (ROOT / "scripts" / "slurm" / "node.sh").read_text()
    assert (image / "scripts" / "run_torchrun.sh").is_file() and "run_torchrun.sh" in node
    # The NGC entry point stays (an ENTRYPOINT would break `docker run IMAGE torchrun ...`).
    assert not BUILD.all("ENTRYPOINT")


def test_the_tools_and_settings_the_scripts_rely_on_are_in_the_image():
    # run_torchrun.sh (node.sh's body) forwards Slurm's warning to the trainers with pkill: the build fails if
    # the image lacks it.
    assert re.search(r"^\s*pkill\b", (ROOT / "scripts" / "run_torchrun.sh").read_text(), re.M)
    assert ["command", "-v", "pkill"] in [argv for _, argv in BUILD.commands()]
    env = BUILD.env()
    # megatron-core's tensor-parallel communication overlap orders kernels on one CUDA connection.
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert int(env["OMP_NUM_THREADS"]) >= 1 and env["PYTHONUNBUFFERED"] == "1"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("FROM a\nRUN x \\\n  # note\n  && y\n", [("FROM", "a"), ("RUN", "x && y")]),
        ('ARG B=img:1\nFROM ${B}\nCMD ["python", "r.py"]\n', [("ARG", "B=img:1"), ("FROM", "img:1"), ("CMD", '["python", "r.py"]')]),
    ],
)  # fmt: skip
def test_the_parser_joins_continuations_drops_comments_and_substitutes_args(text, expected):
    build = Build(text)
    assert [(i.keyword, i.value) for i in build.resolved] == expected
    assert shell_commands('a -c "x && y" > f && b | c') == [["a", "-c", "x && y", ">", "f"], ["b"], ["c"]]
