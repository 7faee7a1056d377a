"""The CI configurations for forks (.github/workflows/, .gitlab-ci.yml): `make lint`'s validators accept them,
reject a broken copy (so the lint can fail), and the jobs run what the README says. Fast: no engine, no network.

The validators come from this interpreter's bin folder (requirements/dev.txt puts them in .venv): a missing one
is a skip for a learner, a failure under CI.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))
CI_YML = REPO / ".github" / "workflows" / "ci.yml"
ACTIONLINT_CONFIG = REPO / ".github" / "actionlint.yaml"
GITLAB_CI = REPO / ".gitlab-ci.yml"
BIN = Path(sys.executable).parent      # not resolved: a venv's python is a link to the base interpreter

# Any attempt to reach the network goes to a closed port and fails: the checks must work offline.
OFFLINE = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": "",
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "no_proxy": ""}


def tool(name: str) -> Path:
    exe = BIN / name
    if not (exe.is_file() and os.access(exe, os.X_OK)):
        message = f"{name} is not installed next to {sys.executable} (pip install -r requirements/dev.txt)"
        if os.environ.get("CI"):
            pytest.fail(message)       # CI installs requirements/dev.txt: the checks must run there
        pytest.skip(message)
    return exe


def actionlint(*files: Path) -> subprocess.CompletedProcess:
    """As `make lint` runs it: shellcheck and pyflakes off, so that the result does not depend on PATH."""
    return run([tool("actionlint"), "-config-file", ACTIONLINT_CONFIG, "-shellcheck=", "-pyflakes=", *files])


def check_jsonschema(schema: str, *files: Path) -> subprocess.CompletedProcess:
    return run([tool("check-jsonschema"), "--builtin-schema", schema, *files])


def rejected(done: subprocess.CompletedProcess) -> bool:
    """check-jsonschema failed on a validation error (not on a crash or a network error)."""
    return done.returncode != 0 and "Schema validation errors were encountered" in done.stdout


def run(argv) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **OFFLINE})


def broken_copy(tmp_path: Path, source: Path, old: str, new: str) -> Path:
    text = source.read_text()
    assert old in text, f"{source.name} no longer contains {old!r}: update this test's broken copy"
    path = tmp_path / source.name
    path.write_text(text.replace(old, new, 1))
    return path


# --- the committed files pass every validator ----------------------------------------------------------------

def test_there_are_workflows():
    assert CI_YML in WORKFLOWS


def test_workflows_pass_actionlint():
    done = actionlint(*WORKFLOWS)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("schema", ["vendor.github-workflows", "custom.github-workflows-require-timeout"])
def test_workflows_match_the_schema(schema):
    done = check_jsonschema(schema, *WORKFLOWS)
    assert done.returncode == 0, done.stdout + done.stderr


def test_gitlab_ci_matches_the_schema():
    done = check_jsonschema("vendor.gitlab-ci", GITLAB_CI)
    assert done.returncode == 0, done.stdout + done.stderr


# --- a broken copy is rejected: the lint can fail ------------------------------------------------------------

WORKFLOW_BREAKS = {
    "runs-on missing": ("    runs-on: ubuntu-24.04\n", ""),
    "step: for steps:": ("    steps:\n", "    step:\n"),
}


@pytest.mark.parametrize("old, new", WORKFLOW_BREAKS.values(), ids=WORKFLOW_BREAKS.keys())
def test_actionlint_rejects_a_broken_workflow(tmp_path, old, new):
    done = actionlint(broken_copy(tmp_path, CI_YML, old, new))
    assert done.returncode != 0, "actionlint accepted a broken workflow"
    assert ("runs-on" if "runs-on" in old else '"step"') in done.stdout


@pytest.mark.parametrize("old, new", WORKFLOW_BREAKS.values(), ids=WORKFLOW_BREAKS.keys())
def test_schema_rejects_a_broken_workflow(tmp_path, old, new):
    done = check_jsonschema("vendor.github-workflows", broken_copy(tmp_path, CI_YML, old, new))
    assert rejected(done), "check-jsonschema accepted a broken workflow:\n" + done.stdout + done.stderr


def test_timeout_schema_rejects_a_job_without_timeout(tmp_path):
    broken = broken_copy(tmp_path, CI_YML, "    timeout-minutes: 90\n", "")
    done = check_jsonschema("custom.github-workflows-require-timeout", broken)
    assert rejected(done), "a job without timeout-minutes passed:\n" + done.stdout + done.stderr


def test_schema_rejects_a_broken_gitlab_ci(tmp_path):
    broken = broken_copy(tmp_path, GITLAB_CI, "  script:\n    - make setup\n", "  scripts:\n    - make setup\n")
    done = check_jsonschema("vendor.gitlab-ci", broken)
    assert rejected(done), "check-jsonschema accepted a broken .gitlab-ci.yml:\n" + done.stdout + done.stderr
    assert "'scripts' was unexpected" in done.stdout


# --- what the jobs run ---------------------------------------------------------------------------------------

def workflow() -> dict:
    return yaml.safe_load(CI_YML.read_text())


def gitlab() -> dict:
    return yaml.safe_load(GITLAB_CI.read_text())


def commands(job: dict) -> list[str]:
    """Each line of the job's `run:` steps, stripped."""
    return [line.strip() for step in job["steps"] for line in step.get("run", "").splitlines() if line.strip()]


def flat(lines) -> list[str]:
    """A GitLab script (nested lists from YAML anchors flattened), one stripped line each."""
    out = []
    for item in lines:
        out += flat(item) if isinstance(item, list) else [ln.strip() for ln in str(item).splitlines() if ln.strip()]
    return out


def test_ci_run_is_make_test():
    """The CPU jobs mirror .ci/run, which is the README's `make test`."""
    assert "make test" in (REPO / ".ci" / "run").read_text().splitlines()


def test_github_jobs_run_the_readme_commands():
    jobs = workflow()["jobs"]
    assert jobs["cpu"]["runs-on"] == "ubuntu-24.04" and "make test" in commands(jobs["cpu"])
    assert set(jobs["gpu"]["runs-on"]) == {"self-hosted", "gpu"}
    assert {"make setup GPU=1", "make test-gpu GPU=1"} <= set(commands(jobs["gpu"]))
    assert jobs["gpu"]["env"]["GPU"] == "1"       # `make test-gpu`'s own `make setup` must keep the CUDA builds
    assert jobs["macos"]["runs-on"] == "macos-14" and "make test" in commands(jobs["macos"])
    assert {name: job["timeout-minutes"] for name, job in jobs.items()} == {"cpu": 90, "gpu": 120, "macos": 120}


def test_github_jobs_cache_the_environments_and_upload_build():
    jobs = workflow()["jobs"]
    for name in ("cpu", "macos"):
        restore = next(s for s in jobs[name]["steps"] if s.get("uses", "").startswith("actions/cache/restore@"))
        assert restore["with"]["path"] == "~/.cache/labkit/envs"
        assert ("hashFiles('requirements/*.txt', 'requirements/*.in', 'scripts/setup.sh', "
                "'scripts/build_llama_tools.sh')") in restore["with"]["key"]
    for name, job in jobs.items():
        upload = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact@"))
        assert upload["if"] == "always()" and upload["with"]["path"] == "build/", name
        assert "continue-on-error" not in job and all("continue-on-error" not in s for s in job["steps"]), name


def test_actions_are_pinned_by_major_version():
    uses = re.findall(r"uses:\s*(\S+)", CI_YML.read_text())
    assert uses and all(re.fullmatch(r"actions/[\w-]+(/[\w-]+)?@v\d+", u) for u in uses), uses


def test_superseded_runs_are_cancelled():
    assert workflow()["concurrency"]["cancel-in-progress"] is True


def test_gitlab_jobs_carry_their_tags_and_run_the_readme_commands():
    ci = gitlab()
    assert ci["cpu"]["tags"] == ["cpu"] and ci["gpu"]["tags"] == ["gpu"]
    assert "make test" in flat(ci["cpu"]["script"])
    assert flat(ci["gpu"]["script"])[0] == "make setup GPU=1" and "make test-gpu GPU=1" in flat(ci["gpu"]["script"])
    for name in ("cpu", "gpu"):
        assert ci[name]["artifacts"]["when"] == "always" and ci[name]["artifacts"]["paths"] == ["build/"]


def test_gitlab_caches_the_environments_inside_the_project():
    ci = gitlab()
    assert ci["variables"]["LABKIT_ENV_CACHE"] == "$CI_PROJECT_DIR/.cache/labkit-envs"
    for name in ("cpu", "gpu"):
        cache = ci[name]["cache"]
        assert cache["paths"] == [".cache/labkit-envs"]
        assert cache["key"]["files"] == ["requirements/lock.txt", "requirements/lock-vllm.txt"]
