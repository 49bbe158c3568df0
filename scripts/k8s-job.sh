#!/usr/bin/env bash
# Run one billsync command in the cluster as a one-off Job, print its output, exit with its code.
#
#   scripts/k8s-job.sh [-n NAMESPACE] [--image IMAGE] [--print] [--no-wait]
#                      [--start-timeout SECONDS] [--] ARGS...
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
# --start-timeout (default 300): how long to wait for the pod to start; a pod waiting for the
# volume (Multi-Attach, while the hourly sync runs on another node) can take longer. Past it the
# script exits 124 and the Job stays: it may still run, and is followed or deleted by hand.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
ns=()
image=""
print=false
wait=true
start_timeout=300
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n | --namespace) ns=(-n "$2"); shift 2 ;;
    --image) image=$2; shift 2 ;;
    --print) print=true; shift ;;
    --no-wait) wait=false; shift ;;
    --start-timeout) start_timeout=$2; shift 2 ;;
    -h | --help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
if [[ $# -eq 0 ]]; then
  echo "usage: scripts/k8s-job.sh [-n NAMESPACE] [--image IMAGE] [--print] [--no-wait] [--start-timeout SECONDS] [--] ARGS..." >&2
  exit 2
fi
if ! [[ $start_timeout =~ ^[0-9]+$ ]]; then
  echo "--start-timeout: $start_timeout is not a number of seconds" >&2
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
kube="kubectl${ns[*]:+ ${ns[*]}}"
deadline=$((SECONDS + start_timeout))
while :; do
  phase=$(kubectl "${ns[@]}" get pods -l "job-name=$name" -o jsonpath='{.items[0].status.phase}' 2>/dev/null || true)
  [[ $phase == Running || $phase == Succeeded || $phase == Failed ]] && break
  if ((SECONDS >= deadline)); then
    # Not a billsync failure: the Job is still there and runs once its pod can start (a replay
    # then sends records), so not exit 1, which would read as "billsync failed".
    echo "job/$name: its pod has not started after ${start_timeout}s (phase ${phase:-not yet created}; a ReadWriteOnce ledger volume still attached to a running pod on another node waits in ContainerCreating: see \`$kube describe job/$name\`)." >&2
    echo "job/$name: the Job is still there and may still run once its pod starts: follow it with \`$kube logs -f job/$name\`, or stop it with \`$kube delete job $name\` (wait longer with --start-timeout)." >&2
    exit 124
  fi
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
if [[ -z $code ]]; then
  echo "job/$name: billsync $*: no exit code yet (the log stream ended but the pod has not terminated); the Job may still be running: see \`$kube describe job/$name\` and \`$kube logs -f job/$name\`" >&2
  exit 124
fi
echo "job/$name: billsync $* exited $code" >&2
exit "$code"
