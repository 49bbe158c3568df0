#!/usr/bin/env bash
# Validate deploy/ offline (PyPI is the only network use, on the first run):
#   1. every Kubernetes manifest against the 1.31 schemas, strictly (unknown fields rejected),
#      with kubernetes-validate in a cached venv;
#   2. what the schemas do not check (scripts/check_deploy.py): concurrencyPolicy, restartPolicy,
#      deadlines, security context, resources, volumes, the kustomization's files, the settings
#      file's keys and secret references, the Dockerfile's inputs;
#   3. the kustomize render, with `kubectl kustomize` or `kustomize build` when one is on PATH
#      (skipped with a message otherwise), validated and checked like the sources.
# Idempotent; the venv lives in ${XDG_CACHE_HOME:-$HOME/.cache}/billsync-venv and is reused.
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSION=1.31.0
REQUIREMENTS="kubernetes-validate==1.37.0 PyYAML==6.0.3"
VENV="${XDG_CACHE_HOME:-$HOME/.cache}/billsync-venv"
K8S=deploy/k8s
# The mapping files are in ../../mappings, outside the kustomization root (see kustomization.yaml).
RESTRICTOR=(--load-restrictor LoadRestrictionsNone)

stamp="$VENV/.billsync-requirements"
if [[ ! -x "$VENV/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "$REQUIREMENTS" ]]; then
  echo "deploy: creating $VENV ($REQUIREMENTS)"
  python3 -m venv "$VENV"
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check $REQUIREMENTS
  echo "$REQUIREMENTS" >"$stamp"
fi
py="$VENV/bin/python"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Manifests in the source tree (not kustomization.yaml, not the settings file billsync.yaml).
manifests=()
for f in "$K8S"/*.yaml; do
  case "$(basename "$f")" in
    kustomization.yaml | billsync.yaml | replay-job.yaml) ;;
    *) manifests+=("$f") ;;
  esac
done

# Render, if a renderer is available.
renderer=""
if command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; then
  renderer="kubectl kustomize"
  kubectl kustomize "${RESTRICTOR[@]}" "$K8S" >"$work/rendered.yaml"
elif command -v kustomize >/dev/null 2>&1; then
  renderer="kustomize build"
  kustomize build "${RESTRICTOR[@]}" "$K8S" >"$work/rendered.yaml"
else
  echo "deploy: neither kubectl nor kustomize is on PATH: render skipped"
fi

rendered_arg=()
[[ -n "$renderer" ]] && rendered_arg=("$work/rendered.yaml")

# 1. Schemas. replay-job.yaml uses generateName, and kubernetes-validate wants a name: validate a
#    copy that has one.
"$py" - "$K8S/replay-job.yaml" "$work/replay-job.named.yaml" <<'PY'
import sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
meta = doc.get("metadata") or {}
meta["name"] = (meta.pop("generateName", None) or meta.get("name") or "billsync-one-off").rstrip("-")
yaml.safe_dump(doc, open(sys.argv[2], "w"), sort_keys=False)
PY
to_validate=("${manifests[@]}" "$work/replay-job.named.yaml" "${rendered_arg[@]}")
if ! out=$("$VENV/bin/kubernetes-validate" --strict -k "$K8S_VERSION" "${to_validate[@]}" 2>&1); then
  echo "$out" >&2
  echo "deploy: kubernetes-validate failed" >&2
  exit 1
fi
if grep -v '^INFO ' <<<"$out" | grep -q .; then
  echo "$out" >&2
  echo "deploy: kubernetes-validate reported warnings (unknown kinds?)" >&2
  exit 1
fi
resources=$(grep -c '^INFO .* passed for resource' <<<"$out")
echo "deploy: kubernetes-validate --strict -k $K8S_VERSION: $resources resources in ${#to_validate[@]} files passed"
if [[ -n "$renderer" ]]; then
  objects=$(grep -c '^kind:' "$work/rendered.yaml")
  echo "deploy: rendered with $renderer ${RESTRICTOR[*]}: $objects objects"
fi

# 2. What the schemas do not check.
"$py" scripts/check_deploy.py . "${rendered_arg[@]}"
echo "deploy: OK"
