"""The deployment manifests: manifests/kuberay/*.yaml (KubeRay RayCluster and
RayService) and manifests/serve-config.yaml (`serve run` / `serve deploy`).

No Ray is started. The KubeRay documents are validated against the OpenAPI v3
schemas of KubeRay's own CRDs, read from ../shared/kuberay-crds next to the
checkout or from $OMNIRAY_KUBERAY_CRDS, the way the API server would validate
them (see `k8s_schema`); where the CRDs are absent only that part skips, and
the structural checks (`structural_errors`, KubeRay's operator-side rules
among them) still run. The Serve configs are validated with Ray Serve's own
schema and resolved against OmniRay: the builder imports and the manifest it
names loads and fits in the NPUs the cluster offers.
"""

from __future__ import annotations

import ast
import copy
import importlib
import json
import os
import re
import shlex
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

from actors.npu import NPU_RESOURCE
from cluster.config import API_KEY_ENV

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[1]
KUBERAY_DIR = ROOT / "manifests" / "kuberay"
SERVE_CONFIG = ROOT / "manifests" / "serve-config.yaml"
CRD_ENV = "OMNIRAY_KUBERAY_CRDS"
DEFAULT_CRD_DIR = Path(__file__).resolve().parents[2] / "shared" / "kuberay-crds"

API_VERSION = "ray.io/v1"
KINDS = ("RayCluster", "RayService")
# KubeRay's name limits (ray-operator utils/validation.go): a RayService's
# cluster name gets a 6-character suffix.
MAX_NAME = {"RayCluster": 53, "RayService": 47}
RESERVED_NPU = "NPU"  # Ray's name for real Ascend devices; OmniRay's emulated ones are NPU_RESOURCE
WORKER_GROUP = "npu-workers"
APP_IMPORT_PATH = "cluster.server:app_from_args"
BUILDER_ARGS = {"manifest", "api_key", "api_key_env"}  # what app_from_args accepts

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~1 MB each


def _load_all(path: Path) -> list:
    return [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d is not None]


def _manifest_docs() -> list[tuple[str, dict]]:
    files = sorted(p for p in KUBERAY_DIR.iterdir() if p.suffix in (".yaml", ".yml"))
    return [(f"{p.name}#{i}", d) for p in files for i, d in enumerate(_load_all(p))]


DOCS = _manifest_docs()
DOC_IDS = [name for name, _ in DOCS]


def _docs_of(kind: str) -> list[dict]:
    return [d for _, d in DOCS if isinstance(d, dict) and d.get("kind") == kind]


def cluster_spec(doc: dict) -> dict:
    """The RayCluster spec inside a RayCluster or a RayService."""
    return doc["spec"]["rayClusterConfig"] if doc["kind"] == "RayService" else doc["spec"]


def groups(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"])] + [(w["groupName"], w) for w in spec.get("workerGroupSpecs") or []]


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def offered_resources(ray_start_params: dict) -> dict:
    """The custom resources `ray start` receives from rayStartParams.resources:
    KubeRay puts `--resources=<value>` in the pod's bash command line, so the
    value is shell-unquoted (shlex) before Ray parses it as JSON."""
    raw = ray_start_params.get("resources")
    if raw is None:
        return {}
    words = shlex.split(f"--resources={raw}")
    assert len(words) == 1, f"rayStartParams.resources {raw!r} splits into {len(words)} shell words"
    value = json.loads(words[0].removeprefix("--resources="))
    assert isinstance(value, dict), f"rayStartParams.resources {raw!r} is not a JSON object"
    return value


def serve_configs() -> list[tuple[str, dict]]:
    out = [("serve-config.yaml", yaml.safe_load(SERVE_CONFIG.read_text()))]
    for doc in _docs_of("RayService"):
        label = f"RayService {doc['metadata']['name']} serveConfigV2"
        out.append((label, yaml.safe_load(doc["spec"]["serveConfigV2"])))
    return out


def _walk(obj, path=""):
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{path}[{i}]")


# ---- structural checks: run with or without the CRDs -----------------------------------------

_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def structural_errors(doc) -> list[str]:
    """What must hold of a RayCluster or RayService even without its CRD: the
    required fields and their types, and KubeRay's operator-side validation
    (ray-operator/controllers/ray/utils/validation.go) that no schema expresses."""
    if not isinstance(doc, dict):
        return ["document: not a mapping"]
    errs = []
    if doc.get("apiVersion") != API_VERSION:
        errs.append(f"apiVersion: {doc.get('apiVersion')!r}, expected {API_VERSION}")
    kind = doc.get("kind")
    if kind not in KINDS:
        return errs + [f"kind: {kind!r}, expected one of {KINDS}"]
    name = (doc.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not _DNS1035.fullmatch(name) or len(name) > MAX_NAME[kind]:
        errs.append(f"metadata.name: {name!r} is not a DNS-1035 label of at most {MAX_NAME[kind]} characters")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return errs + ["spec: missing or not a mapping"]
    if kind == "RayService":
        if not isinstance(spec.get("serveConfigV2"), str):
            errs.append("spec.serveConfigV2: must be a string (a YAML document inside the YAML)")
        spec, where = spec.get("rayClusterConfig"), "spec.rayClusterConfig"
        if not isinstance(spec, dict):
            return errs + [f"{where}: missing or not a mapping"]
    else:
        where = "spec"

    head = spec.get("headGroupSpec")
    workers = spec.get("workerGroupSpecs", [])
    if not isinstance(head, dict):
        return errs + [f"{where}.headGroupSpec: missing or not a mapping"]
    if not isinstance(workers, list):
        return errs + [f"{where}.workerGroupSpecs: not a list"]
    entries = [(f"{where}.headGroupSpec", head)]
    entries += [(f"{where}.workerGroupSpecs[{i}]", w) for i, w in enumerate(workers)]
    names = []
    for at, g in entries:
        if not isinstance(g, dict):
            errs.append(f"{at}: not a mapping")
            continue
        params = g.get("rayStartParams", {})
        if not isinstance(params, dict):
            errs.append(f"{at}.rayStartParams: not a mapping")
            params = {}
        for k, v in params.items():
            if not isinstance(v, str):
                errs.append(f"{at}.rayStartParams.{k}: {v!r} is not a string (quote it)")
        if "labels" in params:
            errs.append(f"{at}.rayStartParams.labels: not supported, use the group's `labels` field")
        if g.get("resources") and any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            errs.append(f"{at}: resources set both in rayStartParams and in `resources`")
        ctrs = ((g.get("template") or {}).get("spec") or {}).get("containers")
        if not isinstance(ctrs, list) or not ctrs or not all(isinstance(c, dict) and c.get("name") and c.get("image")
                                                             for c in ctrs):
            errs.append(f"{at}.template.spec.containers: needs at least one container with a name and an image")
        if g is head:
            continue
        name = g.get("groupName")
        if not isinstance(name, str) or not name:
            errs.append(f"{at}.groupName: missing")
        names.append(name)
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        if not isinstance(lo, int) or not isinstance(hi, int):
            errs.append(f"{at}: minReplicas and maxReplicas must be integers")
        else:
            n = g.get("replicas", lo)
            if not (isinstance(n, int) and 0 <= lo <= n <= hi):
                errs.append(f"{at}: needs 0 <= minReplicas ({lo}) <= replicas ({n}) <= maxReplicas ({hi})")
    if len(names) != len(set(names)):
        errs.append(f"{where}.workerGroupSpecs: duplicate groupName in {names}")
    if (spec.get("authOptions") or {}).get("mode") == "token":
        rv = spec.get("rayVersion")
        if not isinstance(rv, str) or _version(rv) < (2, 52, 0):
            errs.append(f"{where}.rayVersion: {rv!r}; authOptions.mode=token needs rayVersion 2.52.0 or newer")
    return errs


# ---- the CRDs' schemas, validated the way the API server does ---------------------------------


def crd_dir() -> Path:
    override = os.environ.get(CRD_ENV)
    if override:
        if not Path(override).is_dir():
            pytest.fail(f"${CRD_ENV}={override}: no such directory")
        return Path(override)
    if not DEFAULT_CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {DEFAULT_CRD_DIR} (set ${CRD_ENV}); structural checks only")
    return DEFAULT_CRD_DIR


@cache
def _crds(directory: Path) -> dict[str, dict]:
    out = {}
    for p in sorted(directory.iterdir()):
        if p.suffix in (".yaml", ".yml"):
            for d in _load_all(p):
                if isinstance(d, dict) and d.get("kind") == "CustomResourceDefinition":
                    out[d["spec"]["names"]["kind"]] = d
    return out


def _transform(node: dict) -> dict:
    """One schema node, recursively: `nullable` becomes a JSON-schema null type,
    and an object with declared properties rejects other fields. The API server
    would prune those silently, but `kubectl apply` (strict field validation, its
    default) rejects them, and a typo dropped silently is a wrong deployment."""
    node = dict(node)
    for key in ("properties", "patternProperties"):
        if key in node:
            node[key] = {k: _transform(v) for k, v in node[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            node[key] = _transform(node[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            node[key] = [_transform(v) for v in node[key]]
    if node.get("nullable") is True and isinstance(node.get("type"), str):
        node["type"] = [node["type"], "null"]
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        node["additionalProperties"] = False
    return node


@cache
def k8s_schema(directory: Path, kind: str, version: str = "v1") -> dict:
    crd = _crds(directory).get(kind)
    assert crd is not None, f"no CRD of kind {kind} in {directory}"
    v = next((v for v in crd["spec"]["versions"] if v["name"] == version), None)
    assert v is not None and v.get("served") and v.get("storage"), f"{kind} {version} is not the served storage version"
    return _transform(v["schema"]["openAPIV3Schema"])


def _list_map_keys(validator, keys, instance, schema):
    """x-kubernetes-list-type: map: no two items with the same key fields (a
    missing key field takes its schema default, e.g. a port's protocol TCP)."""
    if not validator.is_type(instance, "array"):
        return
    props = (schema.get("items") or {}).get("properties", {})
    seen = {}
    for i, item in enumerate(instance):
        if isinstance(item, dict):
            key = tuple(item.get(k, props.get(k, {}).get("default")) for k in keys)
            if key in seen:
                shared = dict(zip(keys, key))
                yield jsonschema.ValidationError(f"items {seen[key]} and {i} share the list-map key {shared}")
            seen.setdefault(key, i)


def _list_type(validator, list_type, instance, schema):
    if list_type == "set" and validator.is_type(instance, "array"):
        items = [json.dumps(x, sort_keys=True) for x in instance]
        if len(items) != len(set(items)):
            yield jsonschema.ValidationError("duplicate items in a list of type set")


def _cel_rules(validator, rules, instance, schema):
    """x-kubernetes-validations: the CEL rules in KubeRay's CRDs are transition
    rules (`self == oldSelf`, only checked on update) and `self in [...]`; any
    other rule fails loudly instead of passing unchecked."""
    for r in rules:
        rule = r["rule"]
        if "oldSelf" in rule:
            continue
        m = re.fullmatch(r"\s*self\s+in\s+(\[.*\])\s*", rule)
        if m:
            if instance not in ast.literal_eval(m.group(1)):
                yield jsonschema.ValidationError(r.get("message", rule))
        else:
            yield jsonschema.ValidationError(f"CEL rule {rule!r} is not evaluated by this test: extend _cel_rules")


K8sValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {
    "x-kubernetes-list-map-keys": _list_map_keys,
    "x-kubernetes-list-type": _list_type,
    "x-kubernetes-validations": _cel_rules,
})

# OpenAPI integer formats: what the API server's int32/int64 fields hold.
FORMATS = jsonschema.FormatChecker(formats=())


@FORMATS.checks("int32")
def _int32(v) -> bool:
    return not isinstance(v, int) or -(2**31) <= v < 2**31


@FORMATS.checks("int64")
def _int64(v) -> bool:
    return not isinstance(v, int) or -(2**63) <= v < 2**63


def crd_errors(directory: Path, doc: dict) -> list[str]:
    schema = k8s_schema(directory, doc["kind"])
    validator = K8sValidator(schema, format_checker=FORMATS)
    return sorted(f"{e.json_path}: {e.message}" for e in validator.iter_errors(doc))


# ---- the KubeRay manifests ----------------------------------------------------------------------


def test_manifests_hold_a_raycluster_and_a_rayservice():
    kinds = [d.get("kind") for _, d in DOCS if isinstance(d, dict)]
    assert sorted(kinds) == ["RayCluster", "RayService"], kinds


@pytest.mark.parametrize("doc", [d for _, d in DOCS], ids=DOC_IDS)
def test_structure(doc):
    assert structural_errors(doc) == []


@pytest.mark.parametrize("doc", [d for _, d in DOCS], ids=DOC_IDS)
def test_validates_against_the_kuberay_crd(doc):
    directory = crd_dir()
    assert crd_errors(directory, doc) == []


def test_crd_schemas_are_valid_draft7():
    directory = crd_dir()
    for kind in KINDS:
        K8sValidator.check_schema(k8s_schema(directory, kind))


def test_rayservice_runs_the_raycluster_spec():
    """One cluster shape, written twice: the two files must not drift apart."""
    (cluster,), (service,) = _docs_of("RayCluster"), _docs_of("RayService")
    assert service["spec"]["rayClusterConfig"] == cluster["spec"]


@pytest.mark.parametrize("doc", [d for _, d in DOCS], ids=DOC_IDS)
def test_npu_workers_offer_omni_npu_and_nobody_uses_NPU(doc):
    spec = cluster_spec(doc)
    by_name = dict(groups(spec))
    assert WORKER_GROUP in by_name, f"no worker group {WORKER_GROUP!r}"
    offered = offered_resources(by_name[WORKER_GROUP].get("rayStartParams", {}))
    assert isinstance(offered.get(NPU_RESOURCE), int) and offered[NPU_RESOURCE] > 0, offered
    # The head runs the control plane only: no NPU actor may land there.
    assert offered_resources(by_name["head"].get("rayStartParams", {})).get(NPU_RESOURCE, 0) == 0
    for name, g in by_name.items():
        asked = set(offered_resources(g.get("rayStartParams", {}))) | set(g.get("resources") or {})
        for c in containers(g):
            res = c.get("resources") or {}
            asked |= set(res.get("limits") or {}) | set(res.get("requests") or {})
        assert RESERVED_NPU not in asked, f"group {name} uses Ray's reserved resource {RESERVED_NPU!r}"


@pytest.mark.parametrize("doc", [d for _, d in DOCS], ids=DOC_IDS)
def test_ray_token_auth_stays_on(doc):
    spec = cluster_spec(doc)
    assert (spec.get("authOptions") or {}).get("mode") == "token", "KubeRay must manage a Ray auth token"
    config = yaml.safe_load(doc["spec"]["serveConfigV2"]) if doc["kind"] == "RayService" else None
    for tree in (doc, config):
        for path, node in _walk(tree):
            if isinstance(node, dict):
                assert not (node.get("name") == "RAY_AUTH_MODE" and str(node.get("value", "")).lower() != "token"), path
                assert str(node.get("RAY_AUTH_MODE", "token")).lower() == "token", path  # runtime_env env_vars
            elif isinstance(node, str):
                assert not re.search(r"RAY_AUTH_MODE\s*=\s*['\"]?disabled", node, re.IGNORECASE), path


@pytest.mark.parametrize("doc", [d for _, d in DOCS], ids=DOC_IDS)
def test_every_container_takes_the_api_key_from_a_secret(doc):
    """Serve may build the application on any node, and `omniray serve` runs on the
    head: every container gets OMNIRAY_API_KEY, from a Secret, never as a literal."""
    for name, g in groups(cluster_spec(doc)):
        for c in containers(g):
            (var,) = [e for e in c.get("env") or [] if e.get("name") == API_KEY_ENV] or [None]
            assert var is not None, f"group {name}: container {c['name']} has no {API_KEY_ENV}"
            assert "value" not in var, f"group {name}: {API_KEY_ENV} is a literal, not a Secret"
            ref = var["valueFrom"]["secretKeyRef"]
            assert ref.get("name") and ref.get("key") and not ref.get("optional"), ref


@pytest.mark.parametrize("label,config", serve_configs(), ids=[label for label, _ in serve_configs()])
def test_serve_config_reads_the_api_key_from_the_environment(label, config):
    (app,) = config["applications"]
    args = app.get("args") or {}
    assert args.get("api_key_env") == API_KEY_ENV, f"{label}: the key must come from ${API_KEY_ENV}"
    assert "api_key" not in args, f"{label}: a literal api_key is readable by anyone who reads the config"


def test_serve_config_leaves_ray_auth_alone():
    for path, node in _walk(yaml.safe_load(SERVE_CONFIG.read_text())):
        if isinstance(node, dict):  # e.g. a runtime_env's env_vars
            assert str(node.get("RAY_AUTH_MODE", "token")).lower() == "token", path


def test_worker_resources_parse_as_rays_kuberay_autoscaler_parses_them():
    """Ray's own parser of the rayStartParams `resources` convention (the one its
    KubeRay autoscaler uses) reads the same slots as the shell does."""
    try:
        from ray.autoscaler._private.kuberay.autoscaling_config import (
            _get_custom_resources,
        )
    except ImportError:
        pytest.skip("this Ray has no ray.autoscaler._private.kuberay.autoscaling_config._get_custom_resources")
    for doc in _docs_of("RayCluster") + _docs_of("RayService"):
        for name, g in groups(cluster_spec(doc)):
            params = g.get("rayStartParams", {})
            assert _get_custom_resources({}, params, name) == offered_resources(params)


# ---- broken copies must fail: the validators are not vacuous -------------------------------------


def _raycluster() -> dict:
    return copy.deepcopy(_docs_of("RayCluster")[0])


def _worker(doc):
    return doc["spec"]["workerGroupSpecs"][0]


def _set(fn):
    def mutate(doc):
        fn(doc)
        return doc
    return mutate


BROKEN = {
    "rayStartParams-as-list": _set(lambda d: _worker(d).update(rayStartParams=["--resources={\"omni_npu\": 8}"])),
    "rayStartParams-number-unquoted": _set(
        lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0})),
    "missing-groupName": _set(lambda d: _worker(d).pop("groupName")),
    "missing-headGroupSpec": _set(lambda d: d["spec"].pop("headGroupSpec")),
    "replicas-not-integer": _set(lambda d: _worker(d).update(replicas="one")),
    "maxReplicas-over-int32": _set(lambda d: _worker(d).update(maxReplicas=2**31)),
    "typo-field": _set(lambda d: _worker(d).update(rayStartParam=_worker(d).pop("rayStartParams"))),
    "cpu-as-float": _set(lambda d: containers(_worker(d))[0]["resources"]["limits"].update(cpu=0.5)),
    "bad-memory-quantity": _set(lambda d: containers(_worker(d))[0]["resources"]["limits"].update(memory="32 GB")),
    "duplicate-container-port": _set(lambda d: containers(d["spec"]["headGroupSpec"])[0]["ports"].append(
        {"containerPort": 6379, "name": "gcs-again"})),
    "container-without-name": _set(lambda d: containers(_worker(d))[0].pop("name")),
    "auth-mode-unknown": _set(lambda d: d["spec"]["authOptions"].update(mode="off")),
    "managedBy-not-allowed": _set(lambda d: d["spec"].update(managedBy="someone-else")),
}


@pytest.mark.parametrize("mutate", BROKEN.values(), ids=BROKEN.keys())
def test_broken_copy_fails_crd_validation(mutate):
    directory = crd_dir()
    doc = _raycluster()
    assert crd_errors(directory, doc) == []
    assert crd_errors(directory, mutate(doc)), "the CRD validation accepted a broken manifest"


def test_broken_rayservice_fails_crd_validation():
    directory = crd_dir()
    doc = copy.deepcopy(_docs_of("RayService")[0])
    # a mapping, not the string KubeRay wants
    doc["spec"]["serveConfigV2"] = yaml.safe_load(doc["spec"]["serveConfigV2"])
    assert crd_errors(directory, doc)
    doc = copy.deepcopy(_docs_of("RayService")[0])
    del doc["spec"]["rayClusterConfig"]
    assert crd_errors(directory, doc)


STRUCTURALLY_BROKEN = {k: BROKEN[k] for k in (
    "rayStartParams-as-list", "rayStartParams-number-unquoted", "missing-groupName", "missing-headGroupSpec",
    "container-without-name")}
STRUCTURALLY_BROKEN.update({
    "wrong-apiVersion": _set(lambda d: d.update(apiVersion="ray.io/v1alpha1")),
    "name-not-dns1035": _set(lambda d: d["metadata"].update(name="OmniRay_cluster")),
    "replicas-above-max": _set(lambda d: _worker(d).update(replicas=9, maxReplicas=4)),
    "token-auth-old-ray": _set(lambda d: d["spec"].update(rayVersion="2.51.0")),
    "resources-twice": _set(lambda d: _worker(d).update(resources={"omni_npu": "8"})),
    "duplicate-groupName": _set(lambda d: d["spec"]["workerGroupSpecs"].append(copy.deepcopy(_worker(d)))),
})


@pytest.mark.parametrize("mutate", STRUCTURALLY_BROKEN.values(), ids=STRUCTURALLY_BROKEN.keys())
def test_broken_copy_fails_structural_checks(mutate):
    """The checks that still run without the CRDs are not vacuous either."""
    doc = _raycluster()
    assert structural_errors(doc) == []
    assert structural_errors(mutate(doc))


# ---- the Serve configs (serve-config.yaml and the RayService's serveConfigV2) ----------------


def _fields(model) -> set[str]:
    return set(getattr(model, "model_fields", None) or model.__fields__)


@pytest.mark.parametrize("label,config", serve_configs(), ids=[label for label, _ in serve_configs()])
def test_serve_config_passes_ray_serves_schema(label, config):
    from ray.serve import schema

    validate = getattr(schema.ServeDeploySchema, "model_validate", None) or schema.ServeDeploySchema.parse_obj
    validate(config)
    # Serve ignores unknown keys (forward compatibility), so a typo would drop a
    # setting silently: every key must be one the schema knows.
    assert set(config) <= _fields(schema.ServeDeploySchema), set(config) - _fields(schema.ServeDeploySchema)
    assert set(config.get("http_options") or {}) <= _fields(schema.HTTPOptionsSchema)
    assert set(config.get("grpc_options") or {}) <= _fields(schema.gRPCOptionsSchema)
    for app in config["applications"]:
        assert set(app) <= _fields(schema.ServeApplicationSchema), set(app) - _fields(schema.ServeApplicationSchema)


def _resolve(dotted: str):
    """`pkg.module:attr` (Serve's import_path) or `pkg.module.attr`."""
    module, _, attr = dotted.partition(":") if ":" in dotted else dotted.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _omni_npu_offered(label: str) -> int:
    """The `omni_npu` slots of the cluster a config is deployed to."""
    if label == "serve-config.yaml":  # the `ray start --head` its comment tells users to run
        m = re.search(r"ray start --head --resources='([^']*)'", SERVE_CONFIG.read_text())
        assert m, "serve-config.yaml no longer says how to start Ray with omni_npu"
        return int(json.loads(m.group(1)).get(NPU_RESOURCE, 0))
    (doc,) = _docs_of("RayService")
    total = 0
    for _, g in groups(cluster_spec(doc)):
        pods = 1 if g is cluster_spec(doc)["headGroupSpec"] else g.get("replicas", g["minReplicas"])
        total += pods * int(offered_resources(g.get("rayStartParams", {})).get(NPU_RESOURCE, 0))
    return total


@pytest.mark.parametrize("label,config", serve_configs(), ids=[label for label, _ in serve_configs()])
def test_serve_config_deploys_omniray(label, config):
    from cluster.config import load_manifest

    (app,) = config["applications"]
    assert app["import_path"] == APP_IMPORT_PATH
    assert app.get("route_prefix", "/") == "/"
    assert callable(_resolve(app["import_path"]))
    args = app.get("args") or {}
    assert set(args) <= BUILDER_ARGS, f"app_from_args rejects {set(args) - BUILDER_ARGS}"
    manifest = load_manifest(args["manifest"])
    need = sum(s.ep for s in manifest.instances)
    have = _omni_npu_offered(label)
    assert need <= have, f"{args['manifest']} needs {need} '{NPU_RESOURCE}' slots, the cluster offers {have}"


def test_serve_config_grpc_servicer_is_omnirays():
    from cluster.proxy.grpc_ingress import SERVICER

    config = yaml.safe_load(SERVE_CONFIG.read_text())
    functions = config["grpc_options"]["grpc_servicer_functions"]
    assert functions == [SERVICER]
    assert all(callable(_resolve(f)) for f in functions)
