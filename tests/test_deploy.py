"""labkit.deploy and the files in deploy/: each checked by its format's own tool (chapter 08)."""
import os
from pathlib import Path

import pytest
import yaml

from labkit import deploy

DEPLOY = deploy.DEPLOY_DIR
SEED = DEPLOY / "seed"
UNIT = DEPLOY / "systemd" / "llama-server.service"


def need_tool(name):
    """Skip where a learner lacks the tool; in CI (which has it) a missing tool is a failure."""
    if deploy.tool_path(name) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing in CI")
        pytest.skip(f"{name} is not installed")


def an_executable() -> str:
    """A program that exists here, to stand in for the unit's /usr/local/bin/llama-server."""
    from labkit.errors import EngineNotInstalledError
    from labkit.llama_tools import program
    try:
        return str(program("llama-server"))
    except EngineNotInstalledError:
        return "/bin/true"


# --- the files we ship pass every tool ----------------------------------------------------------

@pytest.mark.parametrize("dockerfile", sorted((DEPLOY / "docker").glob("*Dockerfile")), ids=lambda p: p.name)
def test_our_dockerfiles_have_no_hadolint_findings(dockerfile):
    need_tool("hadolint")
    assert deploy.lint_dockerfile(dockerfile) == []


def test_our_compose_file_validates_and_follows_the_rules():
    compose = deploy.validate_compose(DEPLOY / "compose.yaml")
    assert compose.service_names() == ["ollama", "llama-server", "vllm"]
    assert deploy.review_compose(DEPLOY / "compose.yaml") == []
    spec = compose.to_dict()["services"]
    for name, svc in spec.items():
        device = svc["deploy"]["resources"]["reservations"]["devices"][0]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == 1, name
        assert all(str(p).startswith("127.0.0.1:") for p in svc["ports"]), name
    assert spec["llama-server"]["env_file"] == spec["vllm"]["env_file"] == "secrets.env"


@pytest.mark.parametrize("manifest", sorted((DEPLOY / "k8s").glob("*.yaml")), ids=lambda p: p.name)
def test_our_kubernetes_manifests_validate_strictly(manifest):
    names = deploy.validate_k8s(manifest)
    assert {n.split("/")[0] for n in names} >= {"Deployment", "Service", "PersistentVolumeClaim", "HorizontalPodAutoscaler"}
    assert deploy.review_k8s(manifest) == []
    docs = {d["kind"]: d for d in deploy.k8s_documents(manifest)}
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(container)
    metric = docs["HorizontalPodAutoscaler"]["spec"]["metrics"][0]
    assert metric["type"] in ("Pods", "External") and "gpu" not in str(metric).lower()


def test_our_systemd_unit_verifies():
    need_tool("systemd-analyze")
    check = deploy.verify_systemd_unit(UNIT, {"/usr/local/bin/llama-server": an_executable()})
    assert check.ok, check.messages
    text = UNIT.read_text()
    assert "Restart=on-failure" in text and "--host 127.0.0.1" in text and "NoNewPrivileges=yes" in text


# --- the tutorial's files get the findings chapter 08 shows ----------------------------------------

def test_seed_dockerfile_findings():
    need_tool("hadolint")
    codes = [f["code"] for f in deploy.lint_dockerfile(SEED / "Dockerfile.vllm")]
    assert codes == ["DL3007", "DL3013", "DL3042"]      # :latest, unpinned pip, pip cache in the image


def test_seed_compose_is_valid_but_breaks_the_rules():
    deploy.validate_compose(SEED / "docker-compose.yml")          # the specification accepts it
    findings = deploy.review_compose(SEED / "docker-compose.yml")
    assert sum("every interface" in f for f in findings) == 2
    assert sum("not pinned" in f for f in findings) == 2
    assert sum("no healthcheck" in f for f in findings) == 2
    assert any("obsolete" in f for f in findings)


def test_seed_kubernetes_is_valid_but_breaks_the_rules():
    assert deploy.validate_k8s(SEED / "kubernetes.yaml") == ["Deployment/vllm-server", "Service/vllm-service",
                                                             "HorizontalPodAutoscaler/vllm-hpa"]
    findings = deploy.review_k8s(SEED / "kubernetes.yaml")
    assert any("GPU utilisation" in f for f in findings)
    assert any("without a startupProbe" in f for f in findings)
    assert any("'model-cache-pvc', not defined" in f for f in findings)


# --- broken files are rejected with messages naming the field ---------------------------------------

def test_broken_manifest_names_file_object_and_fields(tmp_path):
    docs = deploy.k8s_documents(DEPLOY / "k8s" / "llama-server.yaml")
    dep = next(d for d in docs if d["kind"] == "Deployment")
    dep["spec"]["replicas"] = "two"                                          # wrong type
    del dep["spec"]["selector"]                                              # missing required field
    dep["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["periodSecond"] = 5   # typo
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump_all(docs))
    with pytest.raises(deploy.DeployFileError) as err:
        deploy.validate_k8s(broken)
    message = str(err.value)
    assert f"{broken}: Deployment/llama-server: spec.replicas: 'two' is not of type 'integer'" in message
    assert "spec.selector: 'selector' is a required property" in message
    assert "startupProbe.periodSecond: Additional properties are not allowed" in message
    with pytest.raises(deploy.DeployFileError) as lax:                        # strict=False misses typos
        deploy.validate_k8s(broken, strict=False)
    assert "spec.replicas" in str(lax.value) and "periodSecond" not in str(lax.value)


def test_removed_api_version_is_named(tmp_path):
    hpa = tmp_path / "hpa.yaml"
    hpa.write_text("apiVersion: autoscaling/v2beta2\nkind: HorizontalPodAutoscaler\nmetadata: {name: old}\nspec: {}\n")
    with pytest.raises(deploy.DeployFileError, match=r"HorizontalPodAutoscaler/old: apiVersion/kind: .*autoscaling/v2beta2"):
        deploy.validate_k8s(hpa)


def test_broken_compose_names_the_field(tmp_path):
    bad = tmp_path / "compose.yaml"
    bad.write_text("services:\n  engine:\n    image: x:1\n    healthcheck:\n      interval: banana\n")
    with pytest.raises(deploy.DeployFileError, match=r"compose.yaml: services.engine.healthcheck.interval"):
        deploy.validate_compose(bad)


@pytest.mark.parametrize("edit, expected", [
    (("Restart=on-failure", "Restrat=on-failure"), "Unknown key 'Restrat'"),          # exit 0, still a failure
    (("ExecStart=/usr/local/bin/llama-server", "ExecStart=bin/llama-server"), "Neither a valid executable name nor an absolute path"),
])
def test_broken_unit_fails_verify(tmp_path, edit, expected):
    need_tool("systemd-analyze")
    unit = tmp_path / "llama-server.service"
    unit.write_text(UNIT.read_text().replace(*edit))
    check = deploy.verify_systemd_unit(unit, {"/usr/local/bin/llama-server": an_executable()})
    assert not check.ok and any(expected in m for m in check.messages), check.messages
    assert all("/tmp/" not in m or str(tmp_path) in m for m in check.messages)    # names the file we gave


def test_missing_exec_start_binary_is_reported_without_substitution():
    need_tool("systemd-analyze")
    check = deploy.verify_systemd_unit(UNIT)
    if Path("/usr/local/bin/llama-server").exists():
        pytest.skip("this machine has /usr/local/bin/llama-server")
    assert not check.ok and any("/usr/local/bin/llama-server is not executable" in m for m in check.messages)


# --- probes ----------------------------------------------------------------------------------------

def test_probe_timings_cover_the_measured_start_with_the_margin():
    t = deploy.probe_timings(47.0, safety=3.0, period_s=10)
    # 3 x 47 = 141 s -> 15 periods after the check at time 0: restart at the 16th failure, 150 s
    assert t["startupProbe"]["failureThreshold"] == 16 and t["startup_budget_s"] == 150
    short = deploy.probe_timings(1.4)
    assert short["startupProbe"]["failureThreshold"] == 2 and short["startup_budget_s"] == 10 >= 3 * 1.4
    with pytest.raises(ValueError, match="Measure the start-up"):
        deploy.probe_timings(0)


def test_apply_probe_timings_keeps_the_handlers_and_validates(tmp_path):
    docs = deploy.k8s_documents(DEPLOY / "k8s" / "llama-server.yaml")
    i = next(i for i, d in enumerate(docs) if d["kind"] == "Deployment")
    docs[i] = deploy.apply_probe_timings(docs[i], deploy.probe_timings(47.0))
    probe = docs[i]["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    assert probe["failureThreshold"] == 16 and probe["httpGet"]["path"] == "/health"
    out = tmp_path / "sized.yaml"
    out.write_text(yaml.safe_dump_all(docs))
    assert "Deployment/llama-server" in deploy.validate_k8s(out)


# --- the HPA algorithm, against kubernetes.io's worked examples ------------------------------------

def replicas(rows):
    return [r["replicas"] for r in rows]


def test_hpa_doubles_and_halves_like_the_docs_example():
    # "if the current metric value is 200m, and the desired value is 100m, the number of replicas will be doubled"
    assert replicas(deploy.simulate_hpa([200], 100, 1, 10, start_replicas=3)) == [6]
    # "If the current value is instead 50m, you'll halve the number of replicas" (no stabilisation window)
    assert replicas(deploy.simulate_hpa([50], 100, 1, 10, start_replicas=6, scale_down_window_s=0)) == [3]


def test_hpa_tolerance():
    assert replicas(deploy.simulate_hpa([105, 95], 100, 1, 10, start_replicas=4, scale_down_window_s=0)) == [4, 4]
    assert replicas(deploy.simulate_hpa([112], 100, 1, 10, start_replicas=4)) == [5]      # ceil(4 x 1.12) = 5
    rows = deploy.simulate_hpa([105], 100, 1, 10, start_replicas=4)
    assert rows[0]["formula"] == 5 and rows[0]["replicas"] == 4                         # the formula alone would scale


def test_hpa_min_max_and_scale_up_rate():
    # 1 replica at 10x the target: the formula wants 10, the default policy allows max(2 x 1, 1 + 4) = 5 per period
    assert replicas(deploy.simulate_hpa([1000, 1000, 1000], 100, 1, 8)) == [5, 8, 8]
    assert replicas(deploy.simulate_hpa([0], 100, 2, 8, start_replicas=3, scale_down_window_s=0)) == [2]


def test_hpa_scale_down_waits_for_the_stabilisation_window():
    rows = deploy.simulate_hpa([400] + [0] * 25, 100, 1, 10, start_replicas=1)
    got = replicas(rows)
    assert got[0] == 4 and set(got[1:20]) == {4}               # the 400 recommendation (t=0) holds for 300 s
    assert got[20] == 1 and rows[20]["t_s"] == 300              # t=300 s: outside the window, down to min


def test_hpa_on_a_queue_of_requests_in_flight():
    # 8 requests in flight, engines with 2 slots: 6 wait on one replica; scaling spreads them
    rows = deploy.simulate_hpa([8] * 3 + [0] * 22, 1, 1, 4,
                               observe=lambda n, r: deploy.waiting_per_replica(n, r, slots=2))
    assert rows[0]["metric"] == 6 and replicas(rows)[:3] == [4, 4, 4]
    assert rows[1]["metric"] == 0                               # 4 replicas x 2 slots hold all 8
    assert replicas(rows)[-1] == 1


def test_interconnect_bytes_by_hand():
    b = deploy.interconnect_bytes_per_token(28, 3584, tensor_parallel=2, pipeline_stages=2, bytes_per_value=2)
    assert b["tensor_parallel_per_device"] == 2 * 28 * 3584 * 2 * 2 * 1 / 2    # 2 all-reduces x layers x bytes x 2(N-1)/N
    assert b["pipeline_total"] == 3584 * 2


def test_hpa_on_requests_in_flight_holds_while_the_load_lasts():
    # the manifest's metric: requests in flight per pod, target = 2 slots; 8 in flight need 4 pods
    rows = deploy.simulate_hpa([8] * 30 + [0] * 25, 2, 1, 4, observe=lambda n, r: n / r)
    got = replicas(rows)
    assert got[:30] == [4] * 30                                  # stable under load: 8 / 4 = 2 = target
    assert got[30:49] == [4] * 19 and got[49] == 1               # down 300 s after the last busy sample (29)


def test_hpa_on_waiting_alone_drops_to_the_minimum_under_load():
    # requests_deferred alone: 0 at any capacity above the load, so the rule recommends the minimum
    rows = deploy.simulate_hpa([8] * 30, 1, 1, 4, observe=lambda n, r: deploy.waiting_per_replica(n, r, slots=2))
    assert rows[1]["metric"] == 0 and rows[1]["recommendation"] == 0
    assert rows[20]["replicas"] == 1 and rows[21]["replicas"] == 4   # the window expires, the queue comes back
