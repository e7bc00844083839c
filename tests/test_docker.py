"""The CUDA Docker image (docker/Dockerfile, docker/docker.mk, docker/smoke), checked without
a Docker engine: hadolint, base images pinned by digest, a non-root final user, llama.cpp
built from the local pin by the script the Makefile and CI run, no secrets, what
`make docker-run` would run, and that the image's environment satisfies the Makefile
without installing anything into the mounted clone."""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline.dashboard import LIBRARY_ASSETS, UI_MODULES_ENV

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKER_MK = REPO / "docker" / "docker.mk"
SMOKE = REPO / "docker" / "smoke"
BUILD_SCRIPT = "scripts/build-llama-cpp.sh"
PIN = "scripts/llama-cpp.pin"

DIGEST_REF = re.compile(r"^[a-z0-9][a-z0-9._/-]*(:[A-Za-z0-9._-]+)?@sha256:[0-9a-f]{64}$")


# ---- a small Dockerfile reader ------------------------------------------------------------

@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str


@dataclass
class Stage:
    image: str  # as written, ARGs not substituted
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    def substitute(self, text: str) -> str:
        def value(m: re.Match) -> str:
            name = m.group(1) or m.group(2)
            assert name in self.global_args, f"FROM uses ${name}, which no global ARG defines"
            return self.global_args[name]
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)

    def base_image(self, stage: Stage) -> str:
        """The external image a stage starts from, following FROM <earlier stage>."""
        image = self.substitute(stage.image)
        names = {s.name: s for s in self.stages[: self.stages.index(stage)] if s.name}
        return self.base_image(names[image]) if image in names else image

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def env(self, stage: Stage) -> dict[str, str]:
        out: dict[str, str] = {}
        for ins in stage.instructions:
            if ins.keyword == "ENV":
                for token in shlex.split(ins.args):
                    key, sep, val = token.partition("=")
                    assert sep, f"ENV without '=' (legacy form) is not used here: {ins.args}"
                    out[key] = val
        return out


def logical_lines(text: str) -> list[str]:
    """Instructions with continuations joined; comments and the parser directive dropped
    (inside a continuation, Docker drops comment lines too)."""
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1].rstrip() + " "
            continue
        current += stripped
        if current.strip():
            lines.append(current.strip())
        current = ""
    assert not current, "the Dockerfile ends inside a line continuation"
    return lines


def parse_dockerfile(text: str) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical_lines(text):
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image=words[0], name=name))
        elif not stages:
            assert keyword == "ARG", f"only ARG may come before the first FROM, got {keyword}"
            key, _, default = args.partition("=")
            global_args[key] = default.strip('"')
        else:
            stages[-1].instructions.append(Instruction(keyword, args))
    return Dockerfile(global_args, stages)


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def test_reader_follows_args_stages_and_continuations():
    df = parse_dockerfile(
        "# syntax=docker/dockerfile:1\n"
        "ARG BASE=nvidia/cuda:1-devel@sha256:" + "a" * 64 + "\n"
        "FROM ${BASE} AS build\n"
        "RUN a \\\n"
        "    # a comment inside\n"
        "    && b\n"
        "FROM build AS next\n"
        "USER 1000:1000\n"
    )
    assert df.base_image(df.final) == "nvidia/cuda:1-devel@sha256:" + "a" * 64
    assert df.stage("build").instructions == [Instruction("RUN", "a && b")]
    assert df.final.instructions == [Instruction("USER", "1000:1000")]


# ---- lint ---------------------------------------------------------------------------------

def test_hadolint_passes():
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.is_file(), f"hadolint is not installed next to {sys.executable} (requirements/test.txt)"
    res = subprocess.run([str(hadolint), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                         cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_would_catch_a_regression(tmp_path):
    """The lint above is live: a root final user and an unpinned apt install fail it."""
    hadolint = Path(sys.executable).parent / "hadolint"
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.read_text(encoding="utf-8").replace("USER 1000:1000", "USER root"),
                   encoding="utf-8")
    res = subprocess.run([str(hadolint), "--no-color", str(bad)], capture_output=True, text=True)
    assert res.returncode != 0 and "DL3002" in res.stdout, res.stdout


def test_only_justified_inline_ignores():
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert "global ignore" not in text
    ignores = re.findall(r"#\s*hadolint\s+ignore=(\S+)", text)
    assert set(ignores) <= {"DL3008"}, ignores
    assert "DL3008" not in ignores or "Ubuntu packages are not version-pinned" in text


# ---- base images --------------------------------------------------------------------------

def test_every_from_is_pinned_by_digest(dockerfile):
    assert len(dockerfile.stages) >= 2, "a multi-stage build is expected"
    for stage in dockerfile.stages:
        image = dockerfile.base_image(stage)
        assert DIGEST_REF.match(image), f"FROM {stage.image} -> {image} is not pinned by digest"


def test_build_stage_is_cuda_devel_and_runtime_stage_is_cuda_runtime(dockerfile):
    devel = [s for s in dockerfile.stages if "-devel-" in dockerfile.base_image(s)]
    assert devel and all("nvidia/cuda:" in dockerfile.base_image(s) for s in devel)
    final = dockerfile.base_image(dockerfile.final)
    assert final.startswith("nvidia/cuda:") and "-runtime-" in final, final
    assert "devel" not in final, "the runtime stage must not start from the devel image"
    versions = {re.match(r"nvidia/cuda:([\d.]+)-", dockerfile.base_image(s)).group(1) for s in dockerfile.stages}
    assert len(versions) == 1, f"devel and runtime images differ in CUDA version: {versions}"


def test_base_cuda_matches_torch_cuda(dockerfile):
    """PyPI's torch pins its CUDA libraries through cuda-toolkit==X.Y.*; the base images match."""
    cuda_txt = (REPO / "requirements" / "cuda.txt").read_text(encoding="utf-8")
    toolkit = re.search(r"^cuda-toolkit==(\d+\.\d+)\.", cuda_txt, re.M)
    assert toolkit, "requirements/cuda.txt pins no cuda-toolkit"
    image = dockerfile.base_image(dockerfile.final)
    assert image.startswith(f"nvidia/cuda:{toolkit.group(1)}."), (image, toolkit.group(1))


def test_runtime_stage_takes_only_the_build_outputs_from_the_devel_stage(dockerfile):
    copies = [i.args for i in dockerfile.final.instructions if i.keyword == "COPY" and "--from=" in i.args]
    sources = {re.sub(r"--\S+\s+", "", c).split()[0] for c in copies}
    assert sources == {"/opt/venv", "/opt/agiasi-cache/llama.cpp", "/opt/agiasi-ui/node_modules"}, sources


# ---- user and secrets ---------------------------------------------------------------------

def test_final_stage_user_is_not_root(dockerfile):
    users = [i.args for i in dockerfile.final.instructions if i.keyword == "USER"]
    assert users, "the final stage sets no USER (it would run as root)"
    user, _, group = users[-1].partition(":")
    assert user not in ("root", "0") and group not in ("root", "0"), users[-1]
    assert user.isdigit() and int(user) > 0


SECRET_PATTERNS = [
    re.compile(r"\bhf_[A-Za-z0-9]{20,}"),                 # Hugging Face token
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}"),          # GitHub tokens
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{20,}"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),                  # AWS access key id
    re.compile(r"\bsk-[A-Za-z0-9]{20,}"),                 # OpenAI-style keys
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    # A token variable given a value (not `-e HF_TOKEN`, which passes the caller's through).
    re.compile(r"\b(HF_TOKEN|HUGGING_FACE_HUB_TOKEN|HUGGINGFACE_TOKEN|HF_API_TOKEN)\s*[=:]\s*['\"]?[^\s'\"$\\]"),
]


def secrets_in(text: str) -> list[str]:
    return [m.group(0) for p in SECRET_PATTERNS for m in p.finditer(text)]


@pytest.mark.parametrize("sample", [
    "ENV HF_TOKEN=" + "x" * 8,
    "ARG HF_TOKEN='abc'",
    "-e HF_TOKEN=abc",
    "hf_" + "a1B2" * 9,
    "ghp_" + "Z9" * 18,
])
def test_secret_patterns_catch_tokens(sample):
    assert secrets_in(sample)


def test_no_secrets_in_the_image_sources():
    files = [DOCKERFILE, DOCKER_MK, SMOKE, REPO / ".dockerignore", REPO / "Makefile",
             REPO / "requirements" / "cuda.txt"]
    found = {str(f.relative_to(REPO)): secrets_in(f.read_text(encoding="utf-8")) for f in files}
    assert not any(found.values()), found


def test_no_secret_in_any_arg_or_env(dockerfile):
    secretish = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_KEY|PRIVATE_KEY", re.I)
    names = list(dockerfile.global_args)
    for stage in dockerfile.stages:
        names += [i.args.partition("=")[0] for i in stage.instructions if i.keyword == "ARG"]
        names += list(dockerfile.env(stage))
    assert not [n for n in names if secretish.search(n)], names


def test_dockerignore_keeps_outputs_envs_caches_and_secrets_out():
    entries = {line.strip() for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
               if line.strip() and not line.startswith("#")}
    for needed in (".git", ".venv", "build", "**/__pycache__", ".pytest_cache", "*.gguf", ".env"):
        assert needed in entries, f".dockerignore lacks {needed}"


# ---- llama.cpp: the local pin, built by the script the Makefile and CI run -------------------

def test_dockerfile_builds_llama_cpp_from_the_local_pin_with_the_build_script(dockerfile):
    text = DOCKERFILE.read_text(encoding="utf-8")
    copy = next((i for s in dockerfile.stages for i in s.instructions
                 if i.keyword == "COPY" and BUILD_SCRIPT in i.args.split()), None)
    assert copy, f"no COPY of {BUILD_SCRIPT}"
    *sources, dest = copy.args.split()
    # The script sources <its dir>/llama-cpp.pin: both land in one scripts/ folder.
    assert PIN in sources and dest.endswith("/scripts/"), copy.args
    runs = [i.args for s in dockerfile.stages for i in s.instructions
            if i.keyword == "RUN" and f"{dest}build-llama-cpp.sh" in i.args]
    # Every run of the script is the CUDA variant (the build and the bindings' install).
    assert runs and all(re.search(r"build-llama-cpp\.sh\s+--cuda\b", r) for r in runs), runs
    # The commit lives only in the pin; the image never fetches llama.cpp another way.
    pin = (REPO / PIN).read_text(encoding="utf-8")
    commit = re.search(r"^LLAMA_CPP_COMMIT=([0-9a-f]{40})$", pin, re.M).group(1)
    assert commit not in text and commit[:7] not in text
    assert not re.search(r"\b[0-9a-f]{40}\b", re.sub(r"sha256:[0-9a-f]{64}", "", text))
    assert "git clone" not in text and "llama-cpp-python==" not in text


def test_cuda_architectures_default_to_consumer_and_data_centre_gpus(dockerfile):
    build_args = {i.args.partition("=")[0]: i.args.partition("=")[2].strip('"')
                  for s in dockerfile.stages for i in s.instructions if i.keyword == "ARG"}
    archs = set(build_args["CUDA_DOCKER_ARCH"].split(";"))
    assert {"86", "89", "80", "90"} <= archs, archs  # RTX 30xx, RTX 40xx, A100, H100


def host_env(**extra: str) -> dict[str, str]:
    """This machine's environment as a user's shell has it: not the image's."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("AGIASI_IMAGE_ENV", "VENV", "GGML_CUDA", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env.update(extra)
    return env


def make_dry_run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "-n", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_makefile_and_ci_build_llama_cpp_with_the_same_script():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^make test$", ci, re.M), "CI no longer runs `make test`"
    # -B: as on a clean clone, where nothing is built yet.
    res = make_dry_run("-B", "test", env=host_env())
    assert res.returncode == 0, res.stderr
    assert re.search(rf"(^|\s)bash {re.escape(BUILD_SCRIPT)}\b", res.stdout), res.stdout


# ---- make docker-run / docker-smoke ---------------------------------------------------------

def test_docker_run_dry_run(tmp_path):
    hf = tmp_path / "hf-home"
    res = make_dry_run("docker-run", "TARGET=gguf", "CONFIG=my.yaml",
                       env=host_env(HF_HOME=str(hf), HF_TOKEN="not-to-be-printed"))
    assert res.returncode == 0, res.stderr
    out = res.stdout
    run = out[out.index("docker run"):]
    assert "--gpus all" in run
    assert '--user "$(id -u):$(id -g)"' in run
    assert f'-v "{REPO}:/workspace"' in run and "-w /workspace" in run
    assert f'-v "{hf}:/cache/huggingface"' in run and "-e HF_HOME=/cache/huggingface" in run
    assert re.search(r"-e HF_TOKEN(\s|$)", run), "HF_TOKEN is not passed through by name"
    assert "not-to-be-printed" not in out, "the token's value must not be on the command line"
    assert "--add-host=host.docker.internal:host-gateway" in run
    assert '-e OLLAMA_HOST="http://host.docker.internal:11434"' in run
    assert re.search(r'agiasi-soul-fusion:cuda make gguf CONFIG="my\.yaml"', run), run


def test_docker_run_defaults_to_the_users_hf_cache(tmp_path):
    env = host_env(HOME=str(tmp_path))
    env.pop("HF_HOME", None)
    res = make_dry_run("docker-run", "TARGET=train", env=env)
    assert res.returncode == 0, res.stderr
    assert f'-v "{tmp_path}/.cache/huggingface:/cache/huggingface"' in res.stdout


def test_docker_run_needs_a_target():
    res = subprocess.run(["make", "--no-print-directory", "docker-run", "DOCKER=false"], cwd=REPO,
                         env=host_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "usage: make docker-run TARGET=" in res.stderr


def test_docker_build_and_smoke_dry_run():
    res = make_dry_run("docker-build", "CUDA_DOCKER_ARCH=86;90", env=host_env())
    assert res.returncode == 0, res.stderr
    assert "docker build --file docker/Dockerfile --tag agiasi-soul-fusion:cuda" in res.stdout
    assert '--build-arg CUDA_DOCKER_ARCH="86;90"' in res.stdout
    res = make_dry_run("docker-smoke", env=host_env())
    assert res.returncode == 0, res.stderr
    assert "--gpus all" in res.stdout and "agiasi-soul-fusion:cuda bash docker/smoke" in res.stdout


def test_help_lists_the_docker_targets():
    res = subprocess.run(["make", "--no-print-directory", "help"], cwd=REPO, env=host_env(),
                         capture_output=True, text=True, timeout=120)
    for target in ("docker-build", "docker-run", "docker-smoke"):
        assert re.search(rf"^\s+{target}\s+\S", res.stdout, re.M), res.stdout


def test_smoke_script_covers_the_gpu_paths():
    assert SMOKE.stat().st_mode & stat.S_IXUSR, "docker/smoke is not executable"
    assert subprocess.run(["bash", "-n", str(SMOKE)]).returncode == 0
    code = "\n".join(line for line in SMOKE.read_text(encoding="utf-8").splitlines()
                     if not line.lstrip().startswith("#"))
    for needed in ("nvidia-smi -L", "scripts/gpu_smoke.py", "llama-quantize", "--list-devices",
                   "llama_supports_gpu_offload", 'device="cuda"'):
        assert needed in code, f"docker/smoke does not check {needed}"
    assert re.search(r"^make demo\b", code, re.M), "docker/smoke does not run the demo chain"


def test_smoke_refuses_to_run_outside_the_image():
    res = subprocess.run(["bash", str(SMOKE)], env=host_env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "make docker-smoke" in res.stderr


# ---- the image's environment satisfies the Makefile ----------------------------------------

def test_image_env_satisfies_the_makefile_without_installing(dockerfile):
    env = dockerfile.env(dockerfile.final)
    assert env.get("AGIASI_IMAGE_ENV") == "1" and env.get("VENV") == "/opt/venv"
    assert env.get("GGML_CUDA") == "ON", "the image's make must pick the CUDA build of llama.cpp"
    image = host_env(AGIASI_IMAGE_ENV="1", VENV="/opt/venv", GGML_CUDA="ON",
                     AGIASI_CACHE_DIR=env["AGIASI_CACHE_DIR"])
    res = make_dry_run("-B", "test", env=image)
    assert res.returncode == 0, res.stderr
    assert "/opt/venv/bin/python -m pytest" in res.stdout
    for setup in ("-m venv", "pip install", "build-llama-cpp.sh", ".installed", ".llama-cpp"):
        assert setup not in res.stdout, f"the image's make would set up ({setup}):\n{res.stdout}"
    res = make_dry_run("-B", "venv", "llama-cpp", env=image)
    assert res.returncode == 0 and (not res.stdout.strip() or "Nothing to be done" in res.stdout), res.stdout


def test_plain_make_still_sets_up_the_local_env():
    res = make_dry_run("-B", "test", env=host_env())
    assert res.returncode == 0, res.stderr
    assert "-m venv .venv" in res.stdout and ".venv/bin/python -m pytest" in res.stdout


def test_image_holds_the_llama_cpp_build_where_the_script_looks_for_it(dockerfile):
    build, final = dockerfile.stage("build"), dockerfile.final
    cache = dockerfile.env(final)["AGIASI_CACHE_DIR"]
    assert dockerfile.env(build)["AGIASI_CACHE_DIR"] == cache
    expected = subprocess.run(["bash", str(REPO / BUILD_SCRIPT), "--cuda", "--print-dir"],
                              env=host_env(AGIASI_CACHE_DIR=cache), capture_output=True, text=True,
                              check=True).stdout.strip()
    copied = [i.args.split()[-2:] for i in final.instructions if i.keyword == "COPY" and "--from=" in i.args]
    assert any(expected.startswith(src + "/") and src == dst for src, dst in copied), (expected, copied)
    assert dockerfile.env(build)["VENV"] == dockerfile.env(final)["VENV"] == "/opt/venv"


def test_image_installs_the_pinned_cuda_requirements(dockerfile):
    cuda_txt = (REPO / "requirements" / "cuda.txt").read_text(encoding="utf-8")
    lines = [line.strip() for line in cuda_txt.splitlines() if line.strip() and not line.startswith("#")]
    assert "-r base.txt" in lines
    for line in lines:
        assert line.startswith("-r ") or re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+]+", line), line
    cpu_torch = re.search(r"^torch==(\S+)$", (REPO / "requirements" / "cpu.txt").read_text(), re.M).group(1)
    assert f"torch=={cpu_torch}" in lines, "the image's torch differs from the local one"
    runs = " ".join(i.args for i in dockerfile.stage("build").instructions if i.keyword == "RUN")
    assert "-r /src/requirements/cuda.txt" in runs and "pip==" in runs
    copies = " ".join(i.args for i in dockerfile.stage("build").instructions if i.keyword == "COPY")
    assert "requirements/base.txt" in copies and "requirements/cuda.txt" in copies


def test_image_serves_the_dashboards_pinned_chart_library(dockerfile):
    """`make docker-run` mounts the clone over /workspace, so a `make ui` at image build would be
    hidden: the build stage installs the lock file's uPlot (npm ci, no install scripts) outside it,
    the runtime stage copies node_modules alone, and AGIASI_UI_MODULES names it for the dashboard."""
    build, final = dockerfile.stage("build"), dockerfile.final
    steps = [(i.keyword, i.args) for i in build.instructions]
    at = steps.index(("WORKDIR", "/opt/agiasi-ui"))
    assert steps[at + 1] == ("COPY", "pipeline/ui/package.json pipeline/ui/package-lock.json ./")
    assert steps[at + 2][0] == "RUN" and steps[at + 2][1].startswith("npm ci --ignore-scripts"), steps[at + 2]
    copied = [i.args.split()[-2:] for i in final.instructions if i.keyword == "COPY" and "--from=" in i.args]
    modules = dockerfile.env(final)["AGIASI_UI_MODULES"]
    assert [modules, modules] in copied and modules == "/opt/agiasi-ui/node_modules"
    assert not modules.startswith("/workspace")
    assert UI_MODULES_ENV == "AGIASI_UI_MODULES"
    assert all(rel.startswith("uplot/") for rel in LIBRARY_ASSETS.values())
