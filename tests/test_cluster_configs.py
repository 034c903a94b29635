"""Static checks of the deployment files under cluster/ (no cloud, no cluster).

* cluster/aws.yaml is validated against the autoscaler JSON schema shipped in
  the installed ray package (ray/autoscaler/ray-schema.json, not a copy), first
  as written and then after Ray's own default-filling, the way `ray up` does.
* Every Kubernetes manifest under cluster/kuberay/ is parsed document by
  document and checked for the fields KubeRay and Kubernetes need.
* The copies of the RayJob spec (nightly ConfigMap, RayCronJob) must equal
  rayjob.yaml, so the one-off and the nightly runs cannot drift apart.
* No AWS access key material anywhere under cluster/.
* `ray job submit --working-dir .` packs what a job needs and leaves .git/ behind.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
AWS_YAML = CLUSTER / "aws.yaml"
KUBERAY = CLUSTER / "kuberay"

ARN_PROFILE = re.compile(r"^arn:aws:iam::\d{12}:instance-profile/[\w+=,.@/-]+$")
ARN_ROLE = re.compile(r"^arn:aws:iam::\d{12}:role/[\w+=,.@/-]+$")
DNS1123_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
MAX_RAYJOB_NAME = 47  # KubeRay: RayCluster name limit 53 minus the 6 characters it appends
KEY_PATTERNS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),                    # access key ids
    re.compile(r"aws_secret_access_key", re.I),
    re.compile(r"aws_access_key_id", re.I),
    re.compile(r"aws_session_token", re.I),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]
ENTRYPOINT_PARTS = ["python jobs/annotate.py", "s3://archive/prefix", "--model s3://models/model.pt",
                    "--output s3://results/fer", "--incremental"]


# --------------------------------------------------------------------------- helpers

def load_docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for d in docs:
        assert isinstance(d, dict), f"{path.name}: a YAML document is not a mapping"
    return docs


def kuberay_files() -> list[Path]:
    return sorted(p for p in KUBERAY.rglob("*") if p.suffix in (".yaml", ".yml"))


def all_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in kuberay_files() for d in load_docs(p)]


def docs_of_kind(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in all_docs() if d.get("kind") == kind]


def the_rayjob() -> dict:
    found = [d for p, d in docs_of_kind("RayJob") if p.name == "rayjob.yaml"]
    assert len(found) == 1, "cluster/kuberay/rayjob.yaml must hold exactly one RayJob"
    return found[0]


def nightly_configmap() -> dict:
    cronjob = single("CronJob")
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    names = [v["configMap"]["name"] for v in pod.get("volumes", []) if "configMap" in v]
    assert len(names) == 1, "the CronJob pod mounts exactly one ConfigMap (the RayJob template)"
    cms = [d for _, d in docs_of_kind("ConfigMap") if d["metadata"]["name"] == names[0]]
    assert len(cms) == 1, f"ConfigMap {names[0]} mounted by the CronJob is not defined under cluster/kuberay"
    return cms[0]


def single(kind: str) -> dict:
    found = docs_of_kind(kind)
    assert len(found) == 1, f"expected exactly one {kind} under cluster/kuberay, found {len(found)}"
    return found[0][1]


def ray_images(spec: dict) -> list[str]:
    rcs = spec["rayClusterSpec"]
    templates = [rcs["headGroupSpec"]["template"]] + [g["template"] for g in rcs["workerGroupSpecs"]]
    return [c["image"] for t in templates for c in t["spec"]["containers"]]


def check_containers(where: str, pod_spec: dict) -> None:
    containers = pod_spec.get("containers") or []
    assert containers, f"{where}: no containers"
    for c in containers + (pod_spec.get("initContainers") or []):
        assert c.get("name") and c.get("image"), f"{where}: container without name or image"
        res = c.get("resources") or {}
        for part in ("requests", "limits"):
            assert res.get(part), f"{where}/{c['name']}: resources.{part} missing"
            for k in ("cpu", "memory"):
                assert k in res[part], f"{where}/{c['name']}: resources.{part}.{k} missing"


def gpus(container: dict) -> int:
    return int((container.get("resources", {}).get("limits") or {}).get("nvidia.com/gpu", 0))


def check_rayjob_spec(where: str, spec: dict) -> None:
    """What every RayJob spec we ship (one-off, nightly template, RayCronJob) must have."""
    ep = spec.get("entrypoint")
    assert isinstance(ep, str) and ep, f"{where}: spec.entrypoint missing"
    for part in ENTRYPOINT_PARTS:
        assert part in ep, f"{where}: entrypoint lacks {part!r}"
    assert spec.get("shutdownAfterJobFinishes") is True, f"{where}: shutdownAfterJobFinishes must be true"
    ttl = spec.get("ttlSecondsAfterFinished")
    assert isinstance(ttl, int) and ttl >= 0, f"{where}: ttlSecondsAfterFinished must be an int >= 0"

    env = yaml.safe_load(spec.get("runtimeEnvYAML") or "")
    assert isinstance(env, dict) and env.get("working_dir"), \
        f"{where}: runtimeEnvYAML must parse to a mapping with working_dir (jobs/annotate.py is relative)"
    assert "://" in env["working_dir"], \
        f"{where}: a RayJob working_dir must be a remote URI (the submitter pod has no checkout)"
    assert not re.search(r"aws_|secret", spec["runtimeEnvYAML"], re.I), \
        f"{where}: no credentials in runtimeEnvYAML; S3 access comes from IRSA"

    rcs = spec.get("rayClusterSpec")
    assert isinstance(rcs, dict), f"{where}: rayClusterSpec missing"
    head = rcs.get("headGroupSpec")
    assert isinstance(head, dict) and head.get("template"), f"{where}: rayClusterSpec.headGroupSpec missing"
    assert isinstance(head.get("rayStartParams"), dict), f"{where}: headGroupSpec.rayStartParams missing"
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), \
        f"{where}: rayStartParams values must be strings"
    check_containers(f"{where}/head", head["template"]["spec"])

    groups = rcs.get("workerGroupSpecs")
    assert isinstance(groups, list) and groups, f"{where}: rayClusterSpec.workerGroupSpecs missing"
    gpu_groups, cpu_groups = [], []
    for g in groups:
        gw = f"{where}/{g.get('groupName')}"
        assert g.get("groupName"), f"{where}: worker group without groupName"
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        assert isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi and hi >= 1, \
            f"{gw}: need 0 <= minReplicas <= maxReplicas, maxReplicas >= 1"
        assert lo <= g.get("replicas", lo) <= hi, f"{gw}: replicas outside [minReplicas, maxReplicas]"
        check_containers(gw, g["template"]["spec"])
        n_gpu = sum(gpus(c) for c in g["template"]["spec"]["containers"])
        (gpu_groups if n_gpu else cpu_groups).append(g)
    assert gpu_groups, f"{where}: no worker group requests nvidia.com/gpu"
    assert cpu_groups, f"{where}: no CPU-only worker group for decoding"
    for g in gpu_groups:
        for c in g["template"]["spec"]["containers"]:
            if gpus(c):
                req = c["resources"]["requests"].get("nvidia.com/gpu")
                assert req is None or int(req) == gpus(c), \
                    f"{where}/{g['groupName']}: nvidia.com/gpu request must equal the limit"
                assert "gpu" in c["image"], f"{where}/{g['groupName']}: GPU group should use a -gpu image"
        assert g["minReplicas"] == 0, f"{where}/{g['groupName']}: GPU group should scale from zero"
    if any(g["maxReplicas"] > g["minReplicas"] for g in groups):
        assert rcs.get("enableInTreeAutoscaling") is True, \
            f"{where}: worker groups have min < max but enableInTreeAutoscaling is not true"

    version = rcs.get("rayVersion")
    assert version, f"{where}: rayClusterSpec.rayVersion missing"
    for image in ray_images(spec):
        if image.startswith("rayproject/ray"):
            assert image.split(":", 1)[1].startswith(version + "-") or image.endswith(":" + version), \
                f"{where}: image {image} does not match rayVersion {version}"


# --------------------------------------------------------------------------- aws.yaml

@pytest.fixture(scope="module")
def aws() -> dict:
    return yaml.safe_load(AWS_YAML.read_text())


@pytest.fixture(scope="module")
def ray_schema() -> tuple[Path, dict]:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    assert path.is_file(), f"installed ray has no autoscaler schema at {path}"
    return path, json.loads(path.read_text())


def test_aws_yaml_matches_ray_autoscaler_schema(aws, ray_schema):
    _, schema = ray_schema
    # As written ...
    jsonschema.validate(aws, schema)
    # ... and after the default-filling `ray up` does before it validates
    # (defaults.yaml of the provider, setup-command merge, docker checks).
    from ray.autoscaler._private.util import check_legacy_fields, prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(aws))
    validate_config(prepared)  # jsonschema again + head type / min-max consistency
    check_legacy_fields(prepared)


def test_aws_node_types(aws):
    types = aws["available_node_types"]
    head = aws["head_node_type"]
    assert head in types
    assert aws["provider"]["type"] == "aws" and aws["provider"].get("region")
    assert types[head]["resources"].get("CPU") == 0, "head should advertise CPU 0 (no tasks on the head)"

    workers = {k: v for k, v in types.items() if k != head}
    gpu = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) >= 1}
    cpu = {k: v for k, v in workers.items() if not v["resources"].get("GPU")}
    assert len(gpu) == 1, f"expected one GPU worker group, found {sorted(gpu)}"
    assert cpu, "expected a CPU worker group"
    for name, t in workers.items():
        assert t.get("min_workers", 0) == 0, f"{name}: worker groups scale from zero"
        assert t.get("max_workers", 0) >= 1, f"{name}: max_workers must allow at least one node"
        assert t["max_workers"] <= aws["max_workers"], f"{name}: max_workers above the global cap"

    (gname, g), = gpu.items()
    assert re.match(r"^(g4dn|g5|g6|g6e|p3|p4d|p5)\.", g["node_config"]["InstanceType"]), \
        f"{gname}: not an NVIDIA GPU instance type"
    assert "gpu" in g.get("docker", {}).get("worker_image", ""), \
        f"{gname}: GPU nodes need a CUDA image (docker.worker_image ...-gpu)"
    for name, t in cpu.items():
        assert not re.match(r"^(g|p)\d", t["node_config"]["InstanceType"]), f"{name}: GPU instance in CPU group"


def test_aws_uses_instance_profiles_not_keys(aws):
    for name, t in aws["available_node_types"].items():
        prof = t["node_config"].get("IamInstanceProfile") or {}
        assert ARN_PROFILE.match(prof.get("Arn", "")), f"{name}: node_config.IamInstanceProfile.Arn missing"
    assert "aws_credentials" not in aws["provider"], "no credentials in the provider block; use IAM roles"


def test_aws_installs_fer_batch(aws):
    cmds = " ".join(aws.get("setup_commands", []))
    assert "pip install" in cmds and "fer-batch" in cmds
    for remote, local in aws.get("file_mounts", {}).items():
        if remote.rstrip("/").endswith("fer-batch"):
            assert (ROOT / local / "pyproject.toml").is_file(), "file_mounts must point at the repository root"
            assert remote in cmds, "setup_commands must install the mounted working tree"
    images = [aws["docker"]["image"]] + [t.get("docker", {}).get("worker_image", aws["docker"]["image"])
                                         for t in aws["available_node_types"].values()]
    versions = {re.search(r":(\d+\.\d+\.\d+)", i).group(1) for i in images}
    assert len(versions) == 1, f"all nodes must run the same Ray version, got {versions}"
    rj_version = the_rayjob()["spec"]["rayClusterSpec"]["rayVersion"]
    assert versions == {rj_version}, "aws.yaml and rayjob.yaml should run the same Ray version"


# --------------------------------------------------------------------------- secrets

def test_no_aws_keys_anywhere_in_cluster_dir():
    files = [p for p in CLUSTER.rglob("*") if p.is_file()]
    assert AWS_YAML in files and (CLUSTER / "README.md") in files
    for p in files:
        text = p.read_text(errors="replace")
        for pat in KEY_PATTERNS:
            m = pat.search(text)
            assert not m, f"{p.relative_to(ROOT)}: looks like credential material: {m.group(0)!r}"
    assert not docs_of_kind("Secret"), "no Secrets under cluster/kuberay; S3 access comes from IRSA"


# --------------------------------------------------------------------------- kubernetes manifests

@pytest.mark.parametrize("path", kuberay_files(), ids=lambda p: p.name)
def test_every_manifest_document_is_a_named_object(path):
    docs = load_docs(path)
    assert docs, f"{path.name}: no YAML documents"
    for d in docs:
        assert isinstance(d.get("apiVersion"), str) and d["apiVersion"], f"{path.name}: apiVersion missing"
        assert isinstance(d.get("kind"), str) and d["kind"], f"{path.name}: kind missing"
        name = (d.get("metadata") or {}).get("name")
        assert isinstance(name, str) and DNS1123_NAME.match(name), \
            f"{path.name}: {d['kind']} needs a valid metadata.name, got {name!r}"
        if d["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert d["metadata"].get("namespace") == "fer-batch", \
                f"{path.name}: {d['kind']}/{name} should live in namespace fer-batch"


def test_rayjob():
    rj = the_rayjob()
    assert rj["apiVersion"] == "ray.io/v1"
    assert DNS1035_LABEL.match(rj["metadata"]["name"]) and len(rj["metadata"]["name"]) <= MAX_RAYJOB_NAME
    check_rayjob_spec("rayjob.yaml", rj["spec"])


def test_ray_pods_use_an_irsa_service_account():
    accounts = {d["metadata"]["name"]: d for _, d in docs_of_kind("ServiceAccount")}
    specs = [("rayjob.yaml", the_rayjob()["spec"])] + [
        (p.name, d["spec"]["jobTemplate"]) for p, d in docs_of_kind("RayCronJob")]
    for where, spec in specs:
        rcs = spec["rayClusterSpec"]
        for t in [rcs["headGroupSpec"]["template"]] + [g["template"] for g in rcs["workerGroupSpecs"]]:
            sa = t["spec"].get("serviceAccountName")
            assert sa in accounts, f"{where}: Ray pods must run as a ServiceAccount defined here, got {sa!r}"
            arn = (accounts[sa]["metadata"].get("annotations") or {}).get("eks.amazonaws.com/role-arn", "")
            assert ARN_ROLE.match(arn), f"ServiceAccount {sa}: eks.amazonaws.com/role-arn (IRSA) missing"


def test_nightly_cronjob():
    cj = single("CronJob")
    assert cj["apiVersion"] == "batch/v1"
    spec = cj["spec"]
    assert isinstance(spec.get("schedule"), str) and len(spec["schedule"].split()) == 5, \
        "CronJob.spec.schedule must be a 5-field cron expression"
    assert spec.get("concurrencyPolicy") == "Forbid"
    job = spec["jobTemplate"]["spec"]
    assert job.get("backoffLimit") == 0, "a failed creator pod must not create a second RayJob"
    pod = job["template"]["spec"]
    assert pod.get("restartPolicy") in ("Never", "OnFailure")
    check_containers("CronJob", pod)

    # RBAC: the pod's ServiceAccount may create RayJobs, through a RoleBinding.
    sa = pod.get("serviceAccountName")
    assert sa in {d["metadata"]["name"] for _, d in docs_of_kind("ServiceAccount")}
    bindings = [d for _, d in docs_of_kind("RoleBinding")
                if any(s.get("kind") == "ServiceAccount" and s.get("name") == sa for s in d["subjects"])]
    assert bindings, f"no RoleBinding for ServiceAccount {sa}"
    roles = {d["metadata"]["name"]: d for _, d in docs_of_kind("Role")}
    verbs = set()
    for b in bindings:
        assert b["roleRef"]["kind"] == "Role" and b["roleRef"]["name"] in roles
        for rule in roles[b["roleRef"]["name"]]["rules"]:
            if "ray.io" in rule["apiGroups"] and "rayjobs" in rule["resources"]:
                verbs |= set(rule["verbs"])
    assert {"create", "get", "list"} <= verbs, f"Role lacks rayjobs create/get/list, has {sorted(verbs)}"
    assert "*" not in verbs


def test_nightly_template_is_the_rayjob_with_a_unique_name():
    cm = nightly_configmap()
    tpl_text = cm["data"]["rayjob.yaml"]
    run_sh = cm["data"]["run.sh"]
    assert "__RUN_ID__" in tpl_text and "__RUN_ID__" in run_sh and "/template/rayjob.yaml" in run_sh
    tpl = yaml.safe_load(tpl_text)
    assert tpl["kind"] == "RayJob" and tpl["apiVersion"] == "ray.io/v1"
    assert "namespace" not in tpl["metadata"], "the template takes the CronJob's namespace"
    name = tpl["metadata"]["name"].replace("__RUN_ID__", "20991231-235959")  # date -u +%Y%m%d-%H%M%S
    assert DNS1035_LABEL.match(name) and len(name) <= MAX_RAYJOB_NAME, f"bad RayJob name {name!r}"
    selector = re.search(r'SEL="([^"=]+)=([^"]+)"', run_sh)
    assert selector and tpl["metadata"]["labels"].get(selector.group(1)) == selector.group(2), \
        "run.sh finds earlier nightly RayJobs by a label the template must carry"
    check_rayjob_spec("nightly ConfigMap rayjob.yaml", tpl["spec"])
    assert tpl["spec"] == the_rayjob()["spec"], "nightly RayJob template drifted from rayjob.yaml"

    cj = single("CronJob")
    pod = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
    cm_volume = next(v["name"] for v in pod["volumes"] if "configMap" in v)
    assert mounts.get(cm_volume) == "/template"
    assert "/template/run.sh" in " ".join(pod["containers"][0]["command"] + pod["containers"][0].get("args", []))


def test_nightly_script_is_valid_shell(tmp_path):
    shell = shutil.which("dash") or shutil.which("sh")
    if not shell:
        pytest.skip("no POSIX shell to syntax-check run.sh")
    script = tmp_path / "run.sh"
    script.write_text(nightly_configmap()["data"]["run.sh"])
    r = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr


def test_raycronjob_matches_rayjob():
    for path, d in docs_of_kind("RayCronJob"):
        assert d["apiVersion"] == "ray.io/v1"
        assert len(d["spec"]["schedule"].split()) == 5
        # Only the fields KubeRay v1.6 (where RayCronJob first ships) accepts.
        assert set(d["spec"]) <= {"schedule", "jobTemplate", "suspend"}, \
            f"{path.name}: fields beyond KubeRay v1.6's RayCronJob spec"
        check_rayjob_spec(path.name, d["spec"]["jobTemplate"])
        assert d["spec"]["jobTemplate"] == the_rayjob()["spec"], f"{path.name} drifted from rayjob.yaml"


def test_readme_sizing_section():
    text = (CLUSTER / "README.md").read_text()
    assert "see BENCHMARKS.md" in text
    assert "cores_per_gpu" in text
    for cmd in ("ray up", "ray job submit", "kubectl apply"):
        assert cmd in text, f"README lacks `{cmd}`"


def test_the_job_package_leaves_the_history_behind(tmp_path):
    """`ray job submit --working-dir .` zips the tree with Ray's own packaging, which
    .gitignore and .rayignore filter: the code and the default model go, .git/ (every
    shipped model version, 140 MB) and .venv/ stay behind."""
    from ray._private.runtime_env import packaging
    zipped = tmp_path / "package.zip"
    packaging.create_package(str(ROOT), zipped, include_gitignore=True)
    names = zipfile.ZipFile(zipped).namelist()
    assert "fer_batch/models/default.pt" in names and "jobs/annotate.py" in names
    assert not [n for n in names if n.startswith((".git/", ".venv/"))]
