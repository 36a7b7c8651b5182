#!/usr/bin/env bash
# The Kubernetes manifests (deploy/k8s), checked without a cluster:
#   1. kustomize renders the base, every overlay (production; production-keda, which adds the KEDA
#      component);
#   2. every rendered object validates strictly (no unknown field) against the Kubernetes API of
#      K8S_VERSION (default 1.33.0, the oldest version the manifests target); KEDA's objects, whose
#      schemas kubernetes-validate lacks, against deploy/checks/keda-schema.json;
#   3. checkov (framework kubernetes) finds no failed check in what an overlay deploys. The base is
#      left out: it has no namespace and Bunch's image has no digest there, by design (the overlay
#      sets both). checkov's one exception is an annotation beside its reason (checkov-k8s.yaml).
# The tools come from ${CHECKS_BIN:-.venv-checks/bin}: kubectl (its `kustomize`), kubernetes-validate,
# check-jsonschema, checkov, and that environment's python.
set -euo pipefail
cd "$(dirname "$0")/../.."

bin=${CHECKS_BIN:-.venv-checks/bin}
k8s_version=${K8S_VERSION:-1.33.0}
for tool in kubectl kubernetes-validate check-jsonschema checkov python; do
    if [ ! -x "$bin/$tool" ]; then
        echo "k8s.sh: $bin/$tool is missing (CHECKS_BIN names the tools' bin folder)" >&2
        exit 2
    fi
done
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# 1. Render each kustomization: the base and every overlay.
builds=(deploy/k8s/base)
for overlay in deploy/k8s/overlays/*/; do
    builds+=("${overlay%/}")
done
for build in "${builds[@]}"; do
    name=$(basename "$build")
    "$bin/kubectl" kustomize "$build" >"$out/$name.yaml"
    echo "rendered $build ($(grep -c '^kind:' "$out/$name.yaml") objects)"
done

# 2. Strict validation against the Kubernetes API. kubernetes-validate only warns about a kind it
# has no schema for: any such kind but KEDA's (a misspelt apiVersion, say) fails here.
for rendered in "$out"/*.yaml; do
    report=$("$bin/kubernetes-validate" --strict -k "$k8s_version" --quiet "$rendered" 2>&1) || {
        echo "$report" >&2
        exit 1
    }
    unknown=$(echo "$report" | grep "Couldn't find schema" | grep -v "api version keda.sh/v1alpha1" || true)
    if [ -n "$unknown" ]; then
        echo "$unknown" >&2
        exit 1
    fi
done
echo "kubernetes-validate --strict -k $k8s_version: every object of ${builds[*]} is valid"

# KEDA's objects, one JSON file each, against the schema written for them.
mkdir "$out/keda"
"$bin/python" - "$out" <<'EOF'
import json
import sys
from pathlib import Path

import yaml

out = Path(sys.argv[1])
for rendered in sorted(out.glob("*.yaml")):
    for doc in yaml.safe_load_all(rendered.read_text()):
        if doc and doc["apiVersion"].startswith("keda.sh/"):
            name = f"{rendered.stem}-{doc['kind']}-{doc['metadata']['name']}.json"
            (out / "keda" / name).write_text(json.dumps(doc))
EOF
keda_objects=("$out"/keda/*.json)
if [ ! -e "${keda_objects[0]}" ]; then
    echo "no KEDA object rendered: is overlays/production-keda gone?" >&2
    exit 1
fi
"$bin/check-jsonschema" --schemafile deploy/checks/keda-schema.json "${keda_objects[@]}"

# 3. checkov on what the overlays deploy.
for overlay in deploy/k8s/overlays/*/; do
    name=$(basename "$overlay")
    echo "checkov: overlays/$name"
    "$bin/checkov" --config-file deploy/checks/checkov-k8s.yaml -f "$out/$name.yaml"
done
echo "deploy/k8s: all checks passed"
