"""deploy/: the container image and the KubeRay manifests, checked without a cluster: every
manifest (as written and as a site's overlay renders it) against the KubeRay CRDs' OpenAPI
schemas, every entrypoint against the project's own argument parsers, and the image's pins
against the project's."""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import tomllib

import jsonschema
import pytest
import yaml

try:  # libyaml's parser: the CRDs are 3 MB of YAML
    from yaml import CSafeLoader as SafeLoader
except ImportError:  # pragma: no cover
    from yaml import SafeLoader

from pneumo_ray import cli

from ..conftest import REPO, SHARED

KUBERNETES = REPO / "deploy" / "kubernetes"
CRDS = SHARED / "kuberay" / "v1.7.0"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayCronJob": "ray.io_raycronjobs.yaml",
}
PARSERS = {
    "train.py": cli.train_parser,
    "score.py": cli.score_parser,
    "evaluate.py": cli.evaluate_parser,
    "adapt.py": cli.adapt_parser,
}


@functools.cache
def crd_schema(kind: str, version: str) -> dict:
    crd = yaml.load((CRDS / CRD_FILES[kind]).read_text(), Loader=SafeLoader)
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return served["schema"]["openAPIV3Schema"]


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Keys the schema does not know (Kubernetes would drop them in silence: a typo'd field
    is a setting that never takes effect)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(value, dict) and "properties" in schema:
        for key, item in value.items():
            if key not in schema["properties"]:
                found.append(f"{path}.{key}")
            else:
                found += unknown_fields(item, schema["properties"][key], f"{path}.{key}")
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, item in value.items():
            found += unknown_fields(item, schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def validate(document: dict) -> None:
    """A KubeRay object against its CRD's schema: types, enums, required fields (jsonschema)
    and no field the schema does not name."""
    version = document["apiVersion"].split("/")[1]
    schema = crd_schema(document["kind"], version)
    jsonschema.validate(document, schema)
    assert unknown_fields(document, schema) == [], document["metadata"]["name"]


def manifests() -> list[dict]:
    return [
        document
        for path in sorted((KUBERNETES / "base").glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for document in yaml.safe_load_all(path.read_text())
    ]


def rendered(folder) -> list[dict]:
    result = subprocess.run(
        ["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return list(yaml.safe_load_all(result.stdout))


def kuberay_objects(documents: list[dict]) -> list[dict]:
    return [d for d in documents if d["kind"] in CRD_FILES]


def entrypoints(documents: list[dict]) -> list[str]:
    points = []
    for d in documents:
        if d["kind"] == "RayJob":
            points.append(d["spec"]["entrypoint"])
        elif d["kind"] == "RayCronJob":
            points.append(d["spec"]["jobTemplate"]["entrypoint"])
    return points


def cluster_specs(document: dict) -> list[dict]:
    spec = document["spec"]
    if document["kind"] == "RayCluster":
        return [spec]
    if document["kind"] == "RayJob":
        return [spec["rayClusterSpec"]]
    return [spec["jobTemplate"]["rayClusterSpec"]]


# --- schemas ----------------------------------------------------------------------------------


def test_there_is_a_raycluster_a_rayjob_and_a_raycronjob():
    kinds = sorted(d["kind"] for d in kuberay_objects(manifests()))
    assert kinds == ["RayCluster", "RayCronJob", "RayJob"]


@pytest.mark.parametrize("document", kuberay_objects(manifests()), ids=lambda d: d["kind"])
def test_each_manifest_validates_against_its_crd(document):
    validate(document)


def test_the_site_overlay_renders_and_its_objects_validate():
    documents = rendered(KUBERNETES / "overlays" / "example")
    objects = kuberay_objects(documents)
    assert sorted(d["kind"] for d in objects) == ["RayCluster", "RayCronJob", "RayJob"]
    for document in objects:
        validate(document)
        assert document["metadata"]["namespace"] == "radiology-ml"
    # the site's values reached the jobs: images, URIs, schedule, time zone
    site = yaml.safe_load((KUBERNETES / "overlays" / "example" / "site.yaml").read_text())["data"]
    cron = next(d for d in objects if d["kind"] == "RayCronJob")
    assert cron["spec"]["schedule"] == site["schedule"]
    assert cron["spec"]["timeZone"] == site["time-zone"]
    words = shlex.split(cron["spec"]["jobTemplate"]["entrypoint"])
    assert words[words.index("--input") + 1] == site["nightly-input"]
    assert words[words.index("--output") + 1] == site["nightly-output"]
    train = shlex.split(next(d for d in objects if d["kind"] == "RayJob")["spec"]["entrypoint"])
    assert train[train.index("--data") + 1] == site["training-data"]
    assert train[train.index("--storage-path") + 1] == site["checkpoints"]
    images = {c["image"] for d in objects for s in cluster_specs(d) for c in containers(s)}
    assert images == {"registry.hospital.example/ml/pneumo-ray:0.1.0-cpu",
                      "registry.hospital.example/ml/pneumo-ray:0.1.0-gpu"}  # fmt: skip


def test_the_validation_catches_a_typo_and_a_wrong_type():
    (job,) = [d for d in manifests() if d["kind"] == "RayJob"]
    typo = {**job, "spec": {**job["spec"], "shutdownAfterJobFinish": True}}
    with pytest.raises(AssertionError):
        validate(typo)
    wrong = {**job, "spec": {**job["spec"], "backoffLimit": "two"}}
    with pytest.raises(jsonschema.ValidationError):
        validate(wrong)


# --- entrypoints -----------------------------------------------------------------------------


@pytest.mark.parametrize("entrypoint", entrypoints(manifests()), ids=lambda e: e.split()[1])
def test_each_entrypoint_parses_with_the_projects_parser(entrypoint):
    words = shlex.split(entrypoint)
    assert words[0] == "python" and words[1].startswith("/home/ray/pneumo_ray/jobs/")
    script = words[1].rsplit("/", 1)[1]
    args = PARSERS[script](script).parse_args(words[2:])  # SystemExit on a flag that is not
    if script == "train.py":
        cli.train_config(args)  # and the values pass the training's own checks
    assert all(word.startswith("s3://") for word in words if "://" in word)


def test_a_flag_that_does_not_exist_is_refused_by_that_check():
    with pytest.raises(SystemExit):
        cli.score_parser("score.py").parse_args(["--model", "m", "--input", "i", "--output",
                                                 "o", "--no-such-flag"])  # fmt: skip


def test_the_training_job_is_the_gpu_profile():
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality", REPO / "jobs" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    (job,) = [d for d in manifests() if d["kind"] == "RayJob"]
    words = shlex.split(job["spec"]["entrypoint"])
    profile = quality.PROFILES["gpu"]
    assert " ".join(words[8:]) == " ".join(profile)


# --- the clusters ------------------------------------------------------------------------------


def containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


@pytest.mark.parametrize("document", kuberay_objects(manifests()), ids=lambda d: d["kind"])
def test_each_cluster_has_shm_gpu_groups_from_zero_token_auth_and_no_credentials(document):
    for spec in cluster_specs(document):
        assert spec["rayVersion"] == ray_pin()
        assert spec["authOptions"]["mode"] == "token"
        assert spec["enableInTreeAutoscaling"] is True
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            pod = group["template"]["spec"]
            assert pod["serviceAccountName"] == "pneumo-ray"
            shm = [v for v in pod["volumes"] if v["name"] == "dshm"][0]["emptyDir"]
            assert shm["medium"] == "Memory" and shm["sizeLimit"].endswith("Gi")
            for container in pod["containers"]:
                assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
                assert container["resources"]["requests"] == container["resources"]["limits"]
                assert all(e["secretRef"].get("optional") for e in container["envFrom"])
                assert "env" not in container  # credentials come from the Secret or identity
        gpu = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")
        assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
        (worker,) = gpu["template"]["spec"]["containers"]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    text = "\n".join(p.read_text() for p in KUBERNETES.rglob("*.yaml"))
    assert not re.search(
        r"AKIA[0-9A-Z]{12,}|aws_secret_access_key\s*[:=]\s*[A-Za-z0-9/+]{20}", text, re.I
    )


def test_jobs_clean_up_and_retry_and_nights_end_before_the_next():
    jobs = {d["kind"]: d for d in manifests() if d["kind"] in ("RayJob", "RayCronJob")}
    train, night = jobs["RayJob"]["spec"], jobs["RayCronJob"]["spec"]["jobTemplate"]
    for spec in (train, night):
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
        assert spec["backoffLimit"] >= 1  # both jobs resume: checkpoints, committed parts
    assert "--storage-path" in train["entrypoint"]  # where a retried training resumes from
    assert night["activeDeadlineSeconds"] < 24 * 3600  # a night ends before the next starts
    assert jobs["RayCronJob"]["spec"]["schedule"].count(" ") == 4


# --- the image ---------------------------------------------------------------------------------


def ray_pin() -> str:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (ray,) = [d for d in project["dependencies"] if d.startswith("ray[")]
    return ray.split("==")[1]


def test_the_image_installs_the_projects_pins():
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=\"?([^\"\n]*)\"?$", dockerfile, re.M))
    makefile = (REPO / "Makefile").read_text()
    torch_pins = re.search(r"^TORCH_PINS \?= (.+)$", makefile, re.M).group(1).strip()
    assert args["TORCH_PINS"] == torch_pins
    assert args["RAY_VERSION"] == ray_pin()
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert args["PYTHON_TAG"] == "py" + requires.removeprefix(">=").replace(".", "")
    assert "FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${VARIANT}" in dockerfile
    assert '".[pretrained]"' in dockerfile
    assert re.search(r"^USER 1000$", dockerfile, re.M)  # not root
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ignored[ignored.index("*") :][:1] == ["*"]  # nothing but what is named goes in
    assert not any(name.startswith("!") and ("out" in name or "data" in name) for name in ignored)
