#!/usr/bin/env bash
# Run one billsync command in the cluster as a one-off Job, print its output, exit with its code.
#
#   scripts/k8s-job.sh [-n NAMESPACE] [--image IMAGE] [--print] [--no-wait] [--] ARGS...
#
#   scripts/k8s-job.sh -n billing status
#   scripts/k8s-job.sh -n billing replay --status unmapped --reason "reservation rule added" --dry-run
#   scripts/k8s-job.sh -n billing replay --status unmapped --reason "reservation rule added"
#
# The Job is deploy/k8s/replay-job.yaml (the CronJob's pod spec: same settings, mappings,
# Secret, ledger volume, security context) with `args` set to ARGS, a fresh name, and the image
# the CronJob currently runs (read from the cluster; --image to choose). --print only prints the
# manifest (no cluster needed with --image). A pod that finished cannot be `kubectl exec`-ed, and
# the ledger volume is ReadWriteOnce, so a Job like this is the way to reach the ledger.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
ns=()
image=""
print=false
wait=true
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n | --namespace) ns=(-n "$2"); shift 2 ;;
    --image) image=$2; shift 2 ;;
    --print) print=true; shift ;;
    --no-wait) wait=false; shift ;;
    -h | --help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
if [[ $# -eq 0 ]]; then
  echo "usage: scripts/k8s-job.sh [-n NAMESPACE] [--image IMAGE] [--print] [--no-wait] [--] ARGS..." >&2
  exit 2
fi

json_string() {
  local s=$1
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//$'\n'/\\n}
  s=${s//$'\t'/\\t}
  printf '"%s"' "$s"
}
args_json="["
for a in "$@"; do
  [[ $args_json == "[" ]] || args_json+=","
  args_json+=$(json_string "$a")
done
args_json+="]"
command_name=$(printf '%s' "$1" | tr -c 'a-z0-9' '-' | cut -c1-20)
name="billsync-${command_name}-$(date +%s)"

if [[ -z $image && $print == false ]]; then
  image=$(kubectl "${ns[@]}" get cronjob billsync \
    -o jsonpath='{.spec.jobTemplate.spec.template.spec.containers[0].image}')
fi
patch='[{"op":"replace","path":"/spec/template/spec/containers/0/args","value":'"$args_json"'}'
patch+=',{"op":"remove","path":"/metadata/generateName"}'
patch+=',{"op":"add","path":"/metadata/name","value":'"$(json_string "$name")"'}'
if [[ -n $image ]]; then
  patch+=',{"op":"replace","path":"/spec/template/spec/containers/0/image","value":'"$(json_string "$image")"'}'
fi
patch+=']'
manifest=$(kubectl patch --local -f "$root/deploy/k8s/replay-job.yaml" --type=json -p "$patch" -o yaml)
if $print; then
  printf '%s\n' "$manifest"
  exit 0
fi

kubectl "${ns[@]}" create -f - <<<"$manifest"
$wait || exit 0

# Wait for the pod to start (or finish), follow its output, then report billsync's exit code.
for _ in $(seq 1 150); do
  phase=$(kubectl "${ns[@]}" get pods -l "job-name=$name" -o jsonpath='{.items[0].status.phase}' 2>/dev/null || true)
  [[ $phase == Running || $phase == Succeeded || $phase == Failed ]] && break
  sleep 2
done
kubectl "${ns[@]}" logs -f "job/$name" || true
code=""
for _ in $(seq 1 30); do
  code=$(kubectl "${ns[@]}" get pods -l "job-name=$name" \
    -o jsonpath='{.items[0].status.containerStatuses[0].state.terminated.exitCode}' 2>/dev/null || true)
  [[ -n $code ]] && break
  sleep 2
done
echo "job/$name: billsync $* exited ${code:-with an unknown code (see kubectl describe job/$name)}" >&2
exit "${code:-1}"
