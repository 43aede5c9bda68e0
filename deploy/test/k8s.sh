#!/usr/bin/env bash
# deploy/k8s offline: every manifest and the rendered kustomization validate against the
# Kubernetes OpenAPI schemas (the kubernetes-validate package, strict: unknown fields are
# errors), a broken manifest is rejected (so the validator is really checking), and the
# manifests agree with each other, with the Dockerfiles and with the coordinator's flags:
# ports, probe paths, the token Secret, user ids, GPU requests, resources.
#
# The validator lives in a virtual environment at ${LORASWEEP_K8S_VENV:-/tmp/lorasweep-k8s-venv}
# (created once). The kustomization is rendered with `kubectl kustomize` or `kustomize` when
# one is installed; without either, its resource list must name exactly the manifests present.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
K8S=$REPO/deploy/k8s
VENV=${LORASWEEP_K8S_VENV:-/tmp/lorasweep-k8s-venv}
VALIDATOR_VERSION=1.37.0
KUBERNETES_VERSION=1.33.0
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

log() { printf '[k8s test] %s\n' "$*"; }
fail() {
	log "FAILED: $*" >&2
	exit 1
}

if [[ ! -x $VENV/bin/kubernetes-validate ]] ||
	[[ $("$VENV/bin/python" -m pip show kubernetes-validate 2>/dev/null | sed -n 's/^Version: //p') != "$VALIDATOR_VERSION" ]]; then
	log "installing kubernetes-validate $VALIDATOR_VERSION into $VENV"
	python3 -m venv "$VENV"
	"$VENV/bin/python" -m pip install -q --disable-pip-version-check "kubernetes-validate==$VALIDATOR_VERSION"
fi
validate() { "$VENV/bin/kubernetes-validate" --strict --no-warn -k "$KUBERNETES_VERSION" "$@"; }

manifests=()
for file in "$K8S"/*.yaml; do
	[[ ${file##*/} == kustomization.yaml ]] || manifests+=("${file##*/}")
done
((${#manifests[@]} > 0)) || fail "no manifests in $K8S"
log "validating ${manifests[*]} against Kubernetes $KUBERNETES_VERSION"
(cd "$K8S" && validate "${manifests[@]}") || fail "a manifest does not validate"

# The validator must reject what Kubernetes would reject.
sed 's/^  replicas: 2$/  replicas: two/' "$K8S/worker-deployment.yaml" >"$WORK/bad-type.yaml"
sed 's/^      containers:$/      containerz:/' "$K8S/worker-deployment.yaml" >"$WORK/bad-field.yaml"
for bad in bad-type bad-field; do
	cmp -s "$K8S/worker-deployment.yaml" "$WORK/$bad.yaml" && fail "could not break worker-deployment.yaml ($bad)"
	if validate --quiet "$WORK/$bad.yaml" >/dev/null 2>&1; then
		fail "the validator accepted a broken manifest ($bad)"
	fi
done
log "broken manifests are rejected"

renderer=()
if command -v kubectl >/dev/null && kubectl kustomize --help >/dev/null 2>&1; then
	renderer=(kubectl kustomize)
elif command -v kustomize >/dev/null; then
	renderer=(kustomize build)
fi
if ((${#renderer[@]})); then
	"${renderer[@]}" "$K8S" >"$WORK/rendered.yaml"
	log "rendered the kustomization with ${renderer[*]}"
	validate "$WORK/rendered.yaml" || fail "the rendered kustomization does not validate"
	rendered=$WORK/rendered.yaml
else
	log "no kubectl or kustomize here: checking the kustomization's resource list instead"
	rendered=
fi

# Consistency: the Python that kubernetes-validate brings has PyYAML.
"$VENV/bin/python" - "$REPO" "$rendered" "${manifests[@]}" <<'PY'
import pathlib
import re
import sys

import yaml

repo = pathlib.Path(sys.argv[1])
rendered = sys.argv[2]
manifests = sys.argv[3:]
k8s = repo / "deploy" / "k8s"
problems = []


def check(condition, message):
    if not condition:
        problems.append(message)


kustomization = yaml.safe_load((k8s / "kustomization.yaml").read_text())
listed = kustomization.get("resources", [])
check(sorted(listed) == sorted(manifests),
      f"kustomization.yaml resources {sorted(listed)} != manifests present {sorted(manifests)}")
namespace = kustomization.get("namespace")

documents = []
for name in manifests:
    for document in yaml.safe_load_all((k8s / name).read_text()):
        if document:
            documents.append(document)
if rendered:
    rendered_documents = [d for d in yaml.safe_load_all(open(rendered)) if d]
    check(len(rendered_documents) == len(documents),
          f"rendering gave {len(rendered_documents)} objects, the manifests hold {len(documents)}")
    for document in rendered_documents:
        if document["kind"] != "Namespace":
            check(document["metadata"].get("namespace") == namespace,
                  f"{document['kind']} {document['metadata']['name']} is not in namespace {namespace}")
    documents = rendered_documents


def find(kind, name):
    for document in documents:
        if document["kind"] == kind and document["metadata"]["name"] == name:
            return document
    problems.append(f"no {kind} {name}")
    return None


def flags(container):
    out = {}
    for argument in container.get("args", []):
        if argument.startswith("--") and "=" in argument:
            key, value = argument[2:].split("=", 1)
            out[key] = value
    return out


statefulset = find("StatefulSet", "lorasweep-coordinator")
service = find("Service", "lorasweep-coordinator")
deployment = find("Deployment", "lorasweep-worker")
if problems:
    sys.exit("\n".join(problems))

coordinator_pod = statefulset["spec"]["template"]["spec"]
worker_pod = deployment["spec"]["template"]["spec"]
coordinator = coordinator_pod["containers"][0]
worker = worker_pod["containers"][0]
coordinator_flags = flags(coordinator)
worker_flags = flags(worker)
container_ports = {port["name"]: port["containerPort"] for port in coordinator["ports"]}

# The coordinator serves what its ports, probes and Service say.
check(coordinator["args"][0] == "coordinator", "the coordinator container does not run `coordinator`")
check(coordinator_flags.get("listen") == f"0.0.0.0:{container_ports.get('grpc')}",
      f"--listen {coordinator_flags.get('listen')} is not the grpc port {container_ports.get('grpc')}")
check(coordinator_flags.get("metrics-listen") == f"0.0.0.0:{container_ports.get('metrics')}",
      f"--metrics-listen {coordinator_flags.get('metrics-listen')} is not the metrics port")
for probe in ("readinessProbe", "livenessProbe"):
    get = coordinator.get(probe, {}).get("httpGet", {})
    check(get.get("path") == "/healthz" and get.get("port") in ("metrics", container_ports.get("metrics")),
          f"the coordinator's {probe} is not GET /healthz on the metrics port")
for port in service["spec"]["ports"]:
    check(port["targetPort"] in container_ports or port["targetPort"] in container_ports.values(),
          f"Service port {port['name']} targets {port['targetPort']}, which the coordinator does not expose")
check(service["spec"]["selector"].items() <= statefulset["spec"]["template"]["metadata"]["labels"].items(),
      "the Service selector does not select the coordinator pods")
check(statefulset["spec"]["serviceName"] == service["metadata"]["name"],
      "the StatefulSet's serviceName is not the Service")
service_grpc = next(port["port"] for port in service["spec"]["ports"] if port["name"] == "grpc")

# State on the claim.
claims = {claim["metadata"]["name"] for claim in statefulset["spec"].get("volumeClaimTemplates", [])}
mounts = {mount["name"]: mount["mountPath"] for mount in coordinator["volumeMounts"]}
check("state" in claims and mounts.get("state") == "/var/lib/lorasweep",
      "the coordinator's state claim is not mounted at /var/lib/lorasweep")
check(coordinator_flags.get("db", "").startswith("/var/lib/lorasweep/")
      and coordinator_flags.get("artifacts", "").startswith("/var/lib/lorasweep/"),
      "--db and --artifacts are not on the state claim")

# Workers reach the Service with the token.
check(worker["args"][0] == "worker", "the worker container does not run `worker`")
check(worker_flags.get("coordinator") == f"http://{service['metadata']['name']}:{service_grpc}",
      f"workers connect to {worker_flags.get('coordinator')}, not the Service's gRPC port")
for pod, container, what in ((coordinator_pod, coordinator, "coordinator"), (worker_pod, worker, "worker")):
    token_flag = flags(container).get("token-file", "")
    secret_volumes = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    token_mounts = [m for m in container["volumeMounts"] if m["name"] in secret_volumes]
    check(any(token_flag == f"{m['mountPath']}/token" and secret_volumes[m["name"]] == "lorasweep-token"
              for m in token_mounts),
          f"the {what}'s --token-file {token_flag} is not key `token` of Secret lorasweep-token")
    security = pod.get("securityContext", {})
    check(security.get("runAsNonRoot") is True and security.get("runAsUser") == 10001,
          f"the {what} pod does not run as non-root user 10001")
    container_security = container.get("securityContext", {})
    check(container_security.get("allowPrivilegeEscalation") is False
          and container_security.get("readOnlyRootFilesystem") is True
          and "ALL" in container_security.get("capabilities", {}).get("drop", []),
          f"the {what} container's securityContext is not locked down")
    resources = container.get("resources", {})
    for section in ("requests", "limits"):
        check({"cpu", "memory"} <= set(resources.get(section, {})),
              f"the {what} container has no cpu and memory {section}")

gpu = worker["resources"].get("limits", {}).get("nvidia.com/gpu")
check(gpu == 1, f"a worker pod must request exactly one nvidia.com/gpu (found {gpu})")
check(worker_flags.get("gpus") == "0", "a worker must offer its one GPU as --gpus=0")
# Code evaluation runs at the strong sandbox level (Landlock + seccomp + rlimits, which need no
# privilege): the shipped worker does not accept a weaker one (docs/security.md).
check("--allow-weak-sandbox" not in worker.get("args", [])
      and all(e.get("name") != "LORASWEEP_ALLOW_WEAK_SANDBOX" for e in worker.get("env", [])),
      "the shipped worker must not accept a weak code sandbox (--allow-weak-sandbox)")

# The images are the Dockerfiles'.
dockerfiles = {
    "coordinator": (repo / "deploy/docker/coordinator.Dockerfile").read_text(),
    "worker": (repo / "deploy/docker/worker.Dockerfile").read_text(),
}
for what, text in dockerfiles.items():
    check(re.search(r"^USER 10001(:10001)?$", text, re.M) is not None,
          f"{what}.Dockerfile does not switch to user 10001")
    check(re.search(r'^ENTRYPOINT \["/usr/local/bin/lorasweep"\]$', text, re.M) is not None,
          f"{what}.Dockerfile's entrypoint is not /usr/local/bin/lorasweep")
for port in container_ports.values():
    check(re.search(rf"^EXPOSE .*\b{port}\b", dockerfiles["coordinator"], re.M) is not None,
          f"coordinator.Dockerfile does not expose {port}")
check("/var/lib/lorasweep" in dockerfiles["coordinator"], "coordinator.Dockerfile has no /var/lib/lorasweep")
images = {image["name"] for image in kustomization.get("images", [])}
check({"lorasweep-coordinator", "lorasweep-worker"} <= images,
      "kustomization.yaml does not name both images")

if problems:
    sys.exit("inconsistent manifests:\n  " + "\n  ".join(problems))
print("[k8s test] manifests, kustomization and Dockerfiles agree")
PY

log "PASSED"
