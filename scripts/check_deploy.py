#!/usr/bin/env python3
"""Checks of deploy/ that the Kubernetes JSON schemas do not make.

Usage: check_deploy.py REPO_ROOT [RENDERED.yaml]

- the kustomization: every referenced file exists, every mapping file is listed, the example
  Secret and the one-off Job template are not applied;
- the CronJob: concurrency, deadlines, retries, restart policy, grace period, security context,
  resources, volumes, environment (values the schemas accept but billsync must not get);
- the one-off Job template: the same pod spec as the CronJob apart from `args`;
- deploy/k8s/billsync.yaml: parses, uses only known settings keys, secrets only as
  `file:`/`env:` references (file: under the mounted Secret, with a key the Secret has), and
  paths that match the mounts;
- the Dockerfile: copies everything the build reads (include_str! targets too);
- the rendered output (when given): ConfigMaps carry the files, names resolve.
Prints one line per failed check and a summary; exits 1 when a check failed (a missing field
is reported as a failure too; scripts/validate-deploy.sh runs the schemas first).
"""

import copy
import glob
import os
import re
import sys

import yaml

failures = []
passed = 0


def check(ok, message):
    global passed
    if ok:
        passed += 1
    else:
        failures.append(message)
    return ok


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def load_one(path):
    docs = load_all(path)
    if len(docs) != 1:
        raise SystemExit(f"{path}: expected one YAML document, found {len(docs)}")
    return docs[0]


def quantity_bytes(q):
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "k": 10**3, "M": 10**6, "G": 10**9}
    m = re.fullmatch(r"(\d+)([A-Za-z]*)", str(q))
    if not m or m.group(2) not in units and m.group(2) != "":
        return None
    return int(m.group(1)) * units.get(m.group(2), 1)


def duration_seconds(text):
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d)", str(text).strip())
    if not m:
        return None
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def main():
    args = sys.argv[1:]
    root = args[0]
    rendered = args[1] if len(args) > 1 else None
    k8s = os.path.join(root, "deploy", "k8s")

    # --- kustomization -------------------------------------------------------------------
    kz_path = os.path.join(k8s, "kustomization.yaml")
    kz = load_one(kz_path)
    referenced = list(kz.get("resources", []))
    for gen in kz.get("configMapGenerator", []) + kz.get("secretGenerator", []):
        for f in gen.get("files", []):
            referenced.append(f.split("=", 1)[-1])
        for f in gen.get("envs", []):
            referenced.append(f)
    for p in kz.get("patches", []):
        if "path" in p:
            referenced.append(p["path"])
    for ref in referenced:
        check(os.path.exists(os.path.join(k8s, ref)), f"kustomization references {ref}, which does not exist")
    check(
        not {"secret.example.yaml", "replay-job.yaml"} & set(kz.get("resources", [])),
        "kustomization must not apply secret.example.yaml or replay-job.yaml",
    )
    gens = {g["name"]: g for g in kz.get("configMapGenerator", [])}
    check(set(gens) == {"billsync-settings", "billsync-mappings"}, f"configMapGenerator names: {sorted(gens)}")
    listed = sorted(os.path.normpath(os.path.join(k8s, f.split("=", 1)[-1])) for f in gens.get("billsync-mappings", {}).get("files", []))
    present = sorted(
        os.path.normpath(p)
        for p in glob.glob(os.path.join(root, "mappings", "*"))
        # mapping files and the CSV tables they refer to (account directory, rates)
        if p.lower().endswith((".yaml", ".yml", ".csv"))
    )
    check(
        listed == present,
        "billsync-mappings must list every mappings/*.yaml and *.csv exactly (missing: %s, extra: %s)"
        % ([os.path.relpath(p, root) for p in present if p not in listed], [os.path.relpath(p, root) for p in listed if p not in present]),
    )
    check(
        (kz.get("generatorOptions") or {}).get("disableNameSuffixHash") is True,
        "generatorOptions.disableNameSuffixHash must be true (the one-off Job template uses the plain names)",
    )

    # --- CronJob ---------------------------------------------------------------------------
    cj = load_one(os.path.join(k8s, "cronjob.yaml"))
    pvc = load_one(os.path.join(k8s, "pvc.yaml"))
    secret = load_one(os.path.join(k8s, "secret.example.yaml"))
    spec = cj["spec"]
    check(cj.get("kind") == "CronJob" and cj["metadata"]["name"] == "billsync", "cronjob.yaml must be the CronJob billsync")
    check(spec.get("concurrencyPolicy") == "Forbid", "CronJob concurrencyPolicy must be Forbid")
    fields = str(spec.get("schedule", "")).split()
    check(len(fields) == 5 and fields[0].isdigit() and fields[1:] == ["*"] * 4, f"schedule {spec.get('schedule')!r} is not hourly")
    check(isinstance(spec.get("startingDeadlineSeconds"), int) and 0 < spec["startingDeadlineSeconds"] < 3600, "startingDeadlineSeconds must be set, under an hour")
    check("successfulJobsHistoryLimit" in spec and "failedJobsHistoryLimit" in spec, "history limits must be set")
    job = spec["jobTemplate"]["spec"]
    check(isinstance(job.get("backoffLimit"), int) and 0 <= job["backoffLimit"] <= 3, "backoffLimit must be small (0..3)")
    ads = job.get("activeDeadlineSeconds")
    check(isinstance(ads, int) and 0 < ads < 3600, f"activeDeadlineSeconds must be < 3600, got {ads}")
    check(isinstance(job.get("ttlSecondsAfterFinished"), int), "ttlSecondsAfterFinished must be set")
    pfp_codes = [c for r in (job.get("podFailurePolicy") or {}).get("rules", []) if r.get("action") == "FailJob" for c in r.get("onExitCodes", {}).get("values", [])]
    check(1 not in pfp_codes and 0 not in pfp_codes, "podFailurePolicy must not fail the Job at once on exit code 1 (retryable)")
    # README "Exit codes": settings/mappings (2), lock held (3), undelivered (4), sink credentials
    # (5) repeat on a retry; 1, 6 (a SIGTERM) and crashes are worth one.
    check(sorted(pfp_codes) == [2, 3, 4, 5], f"podFailurePolicy FailJob exit codes must be exactly [2, 3, 4, 5] (README), got {sorted(pfp_codes)}")
    pod = job["template"]["spec"]
    check(pod.get("restartPolicy") == "Never", "restartPolicy must be Never")
    tgps = pod.get("terminationGracePeriodSeconds")
    check(isinstance(tgps, int) and 30 <= tgps < 600, f"terminationGracePeriodSeconds must be set (30..600), got {tgps}")
    check(pod.get("automountServiceAccountToken") is False, "automountServiceAccountToken must be false")
    psc = pod.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True, "pod runAsNonRoot must be true")
    check(psc.get("runAsUser") == 65532, "pod runAsUser must be 65532")
    check(psc.get("fsGroup") == 65532, "pod fsGroup must be 65532 (ledger volume)")
    check((psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", "pod seccompProfile must be RuntimeDefault")
    check(len(pod["containers"]) == 1, "one container")
    c = pod["containers"][0]
    check(c["name"] == "billsync", "the container is named billsync (podFailurePolicy refers to it)")
    check(c.get("args") == ["sync"], f"the CronJob runs `sync`, got {c.get('args')}")
    check("command" not in c, "no command override: the image's entrypoint is billsync")
    sc = c.get("securityContext", {})
    check(sc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem must be true")
    check(sc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation must be false")
    check(sc.get("runAsNonRoot") is True, "container runAsNonRoot must be true")
    check((sc.get("capabilities") or {}).get("drop") == ["ALL"], "capabilities must drop ALL")
    check(not (sc.get("capabilities") or {}).get("add"), "no capabilities added")
    check(sc.get("privileged") in (None, False), "not privileged")
    res = c.get("resources", {})
    for kind in ("requests", "limits"):
        check("memory" in res.get(kind, {}), f"resources.{kind}.memory must be set")
    lim = quantity_bytes(res.get("limits", {}).get("memory"))
    check(lim is not None and lim <= 256 * 2**20, "memory limit must be small (<= 256Mi)")
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    check(env.get("BILLSYNC_CONFIG") == "/etc/billsync/billsync.yaml", "BILLSYNC_CONFIG must be /etc/billsync/billsync.yaml")
    check("BILLSYNC_LOG" in env, "BILLSYNC_LOG must be set")
    # SQLite's temporary files (VACUUM copies the whole ledger into one) go to SQLITE_TMPDIR, else
    # /tmp: a small emptyDir, over whose sizeLimit the kubelet evicts the pod. They belong on the
    # ledger's volume, which is sized for the ledger.
    check(env.get("SQLITE_TMPDIR") == "/var/lib/billsync", "SQLITE_TMPDIR must be /var/lib/billsync (the ledger volume), not the small /tmp")
    check(
        not [e for e in c.get("env", []) if e["name"].startswith("BILLSYNC__") and "valueFrom" in e],
        "no secret in BILLSYNC__ env overrides: secrets are files",
    )
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
    vols = {v["name"]: v for v in pod.get("volumes", [])}

    def vol_at(path):
        m = mounts.get(path)
        return (m, vols.get(m["name"])) if m else (None, None)

    m, v = vol_at("/var/lib/billsync")
    check(v is not None and (v.get("persistentVolumeClaim") or {}).get("claimName") == pvc["metadata"]["name"], "the ledger dir /var/lib/billsync must be the PVC")
    check(pvc["spec"].get("accessModes") in (["ReadWriteOnce"], ["ReadWriteOncePod"]), "the ledger PVC must be ReadWriteOnce(Pod)")
    m, v = vol_at("/etc/billsync/billsync.yaml")
    check(v is not None and (v.get("configMap") or {}).get("name") == "billsync-settings" and m.get("subPath") == "billsync.yaml", "settings must be the ConfigMap billsync-settings at /etc/billsync/billsync.yaml")
    m, v = vol_at("/etc/billsync/mappings")
    check(v is not None and (v.get("configMap") or {}).get("name") == "billsync-mappings", "mappings must be the ConfigMap billsync-mappings at /etc/billsync/mappings")
    m, v = vol_at("/var/run/secrets/billsync")
    check(v is not None and (v.get("secret") or {}).get("secretName") == secret["metadata"]["name"] and m.get("readOnly") is True, "the Secret must be mounted read-only at /var/run/secrets/billsync")
    m, v = vol_at("/tmp")
    check(v is not None and "emptyDir" in v, "/tmp must be an emptyDir")
    for path, m in mounts.items():
        if path != "/var/lib/billsync" and path != "/tmp":
            check(m.get("readOnly") is True, f"mount {path} must be readOnly")
    check(set(vols) == {m["name"] for m in c.get("volumeMounts", [])}, "every volume is mounted, every mount has a volume")

    # --- one-off Job template ------------------------------------------------------------
    rj = load_one(os.path.join(k8s, "replay-job.yaml"))
    check(rj.get("kind") == "Job" and "generateName" in rj["metadata"] and "name" not in rj["metadata"], "replay-job.yaml must be a Job with generateName")
    rpod = copy.deepcopy(rj["spec"]["template"]["spec"])
    cpod = copy.deepcopy(pod)
    rargs = rpod["containers"][0].pop("args")
    cpod["containers"][0].pop("args")
    check(rpod == cpod, "replay-job.yaml's pod spec must equal the CronJob's (apart from args)")
    check(rargs[:1] == ["replay"] and "--reason" in rargs and "--dry-run" in rargs, "the template's default args are a --dry-run replay with a reason")
    check(rj["spec"].get("backoffLimit") == 0 and rj["spec"].get("activeDeadlineSeconds", 99999) < 3600, "one-off Job: backoffLimit 0, activeDeadlineSeconds < 3600")

    # --- example Secret ------------------------------------------------------------------
    skeys = set((secret.get("stringData") or {}) | (secret.get("data") or {}))
    check(all("REPLACE-ME" in str(v) for v in (secret.get("stringData") or {}).values()), "secret.example.yaml values must be REPLACE-ME placeholders")

    # --- settings --------------------------------------------------------------------------
    settings = load_one(os.path.join(k8s, "billsync.yaml"))
    known = {
        "": {"ledger", "mappings", "providers", "sinks", "default_sink", "shutdown_deadline", "period_close_delay", "metrics"},
        "metrics": {"pushgateway_url", "job", "instance", "token", "timeout"},
        "ledger": {"path", "lock_ttl"},
        "metalsoft": {"kind", "endpoint", "api_key", "user_ids", "window", "look_back", "settle_delay", "start", "timeout", "retry", "send_datacenter_param", "infrastructure_ids", "billing_account_id"},
        "lago": {"kind", "api_url", "api_key", "batch_size", "timeout", "retry"},
        "retry": {"max_retries", "min_delay", "max_delay"},
    }
    secret_fields = {"api_key"}
    check(isinstance(settings, dict) and set(settings) <= known[""], f"unknown top-level settings keys: {sorted(set(settings) - known[''])}")
    check(set(settings.get("ledger", {})) <= known["ledger"] and "path" in settings.get("ledger", {}), "ledger: only path and lock_ttl, path required")
    lpath = str(settings["ledger"]["path"])
    check(os.path.dirname(lpath) == "/var/lib/billsync", f"ledger.path {lpath} must be in the PVC mount /var/lib/billsync")
    ttl = duration_seconds(settings["ledger"].get("lock_ttl", "15m"))
    check(ttl is not None and ttl < 3600, "ledger.lock_ttl must be under an hour (a killed run's lock expires before the next run)")
    # After SIGTERM billsync lets requests in flight run for shutdown_deadline, records the run,
    # pushes its metrics (metrics.timeout) and releases the lock: all of it before the SIGKILL
    # at terminationGracePeriodSeconds, with room to spare, or the lock stays until lock_ttl.
    deadline = duration_seconds(settings.get("shutdown_deadline", "20s"))
    metrics = settings.get("metrics")
    push = duration_seconds(metrics.get("timeout", "10s")) if isinstance(metrics, dict) else 0
    check(deadline is not None and push is not None, "shutdown_deadline and metrics.timeout must be durations (e.g. 20s)")
    if deadline is not None and push is not None and isinstance(tgps, int):
        check(deadline + push + 10 <= tgps, f"shutdown_deadline ({deadline:g}s) + metrics push ({push:g}s) + 10s must fit in terminationGracePeriodSeconds ({tgps}s)")
    if isinstance(metrics, dict):
        check(set(metrics) <= known["metrics"] and "pushgateway_url" in metrics, f"metrics: pushgateway_url required, unknown keys {sorted(set(metrics) - known['metrics'])}")
        if "token" in metrics:
            check(str(metrics["token"]).startswith(("file:", "env:")), "metrics.token must be a file:/env: reference, never a literal")
    check(settings.get("mappings") == ["/etc/billsync/mappings"], "settings mappings must be [/etc/billsync/mappings]")
    check(settings.get("sinks"), "at least one sink")
    check(len(settings.get("sinks", {})) == 1 or settings.get("default_sink") in settings.get("sinks", {}), "default_sink required with several sinks")
    for section in ("providers", "sinks"):
        for name, entry in (settings.get(section) or {}).items():
            kind = entry.get("kind")
            check(kind in known, f"{section}.{name}: unknown kind {kind!r}")
            check(set(entry) <= known.get(kind, set()), f"{section}.{name}: unknown keys {sorted(set(entry) - known.get(kind, set()))}")
            check(set(entry.get("retry") or {}) <= known["retry"], f"{section}.{name}.retry: unknown keys")
            check(re.fullmatch(r"[a-z][a-z0-9_]*", name) is not None, f"{section}.{name}: use snake_case names (env overrides)")
            for field in secret_fields:
                ref = str(entry.get(field, ""))
                check(ref.startswith(("file:", "env:")), f"{section}.{name}.{field} must be a file:/env: reference, never a literal")
                if ref.startswith("file:"):
                    path = ref[len("file:"):]
                    check(os.path.dirname(path) == "/var/run/secrets/billsync", f"{section}.{name}.{field}: {path} is not under the Secret mount")
                    check(os.path.basename(path) in skeys, f"{section}.{name}.{field}: the Secret has no key {os.path.basename(path)}")

    # --- Dockerfile ------------------------------------------------------------------------
    dockerfile = open(os.path.join(root, "deploy", "Dockerfile")).read()
    copied = set()
    for line in dockerfile.splitlines():
        m = re.match(r"\s*COPY\s+(?!--from)(?:--\S+\s+)*(.+)", line)
        if m:
            parts = m.group(1).split()
            for src in parts[:-1]:
                copied.add(src.rstrip("/"))
                check(os.path.exists(os.path.join(root, src)), f"Dockerfile copies {src}, which does not exist")
    for needed in ("Cargo.toml", "Cargo.lock", "build.rs", "src", "migrations"):
        check(needed in copied, f"Dockerfile must copy {needed}")
    for dirpath, _, files in os.walk(os.path.join(root, "src")):
        for fname in files:
            if not fname.endswith(".rs"):
                continue
            text = open(os.path.join(dirpath, fname)).read()
            for rel in re.findall(r'include_(?:str|bytes)!\(\s*"([^"]+)"', text):
                target = os.path.relpath(os.path.normpath(os.path.join(dirpath, rel)), root)
                check(target.split(os.sep)[0] in copied, f"Dockerfile must copy {target.split(os.sep)[0]} ({fname} includes {rel})")
    # A glibc binary on distroless/cc: builder and runtime must be the same Debian (12, bookworm),
    # or the binary may need a newer glibc than the runtime has.
    check(re.search(r"^FROM gcr\.io/distroless/cc-debian12:nonroot\s*$", dockerfile, re.M) is not None, "runtime image must be distroless/cc-debian12 nonroot")
    check(re.search(r"^FROM rust:\S*-bookworm AS builder\s*$", dockerfile, re.M) is not None, "builder must be Debian 12 (bookworm), the runtime's glibc")
    check(re.search(r"^USER 65532:65532\s*$", dockerfile, re.M) is not None, "Dockerfile must run as USER 65532:65532")
    check(re.search(r"cargo build --release --locked\b", dockerfile) is not None, "release build with --locked")
    check("musl" not in re.sub(r"(?m)^#.*$", "", dockerfile), "no musl build (its allocator halves staging speed)")
    ignore = open(os.path.join(root, "deploy", "Dockerfile.dockerignore")).read().split()
    for needed in copied:
        check(f"!{needed}" in ignore or f"!{needed}/" in ignore, f"Dockerfile.dockerignore excludes {needed}, which the build copies")

    # --- rendered output -------------------------------------------------------------------
    if rendered:
        docs = load_all(rendered)
        by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
        check(set(by) == {("ConfigMap", "billsync-settings"), ("ConfigMap", "billsync-mappings"), ("PersistentVolumeClaim", "billsync-ledger"), ("CronJob", "billsync")}, f"rendered objects: {sorted(by)}")
        cm = by.get(("ConfigMap", "billsync-settings"), {}).get("data", {})
        check(cm.get("billsync.yaml") == open(os.path.join(k8s, "billsync.yaml")).read(), "rendered billsync-settings carries deploy/k8s/billsync.yaml")
        mm = by.get(("ConfigMap", "billsync-mappings"), {}).get("data", {})
        check(sorted(mm) == sorted(os.path.basename(p) for p in present), "rendered billsync-mappings has one key per mapping file")
        for p in present:
            check(mm.get(os.path.basename(p)) == open(p).read(), f"rendered mapping {os.path.basename(p)} is the file's content")
        rcj = by.get(("CronJob", "billsync"))
        if rcj:
            rc = rcj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
            check(re.fullmatch(r"[^:@\s]+/[^:@\s]+(:[\w.-]+|@sha256:[0-9a-f]{64})", rc["image"]) is not None, f"rendered image {rc['image']!r} has a registry and a tag")
            for v in rcj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["volumes"]:
                if "configMap" in v:
                    check(("ConfigMap", v["configMap"]["name"]) in by, f"volume {v['name']}: ConfigMap {v['configMap']['name']} is not rendered")
            labels = rcj["spec"]["jobTemplate"]["spec"]["template"]["metadata"].get("labels", {})
            check(labels.get("app.kubernetes.io/name") == "billsync", "rendered pod template carries app.kubernetes.io/name")

    for f in failures:
        print(f"FAIL {f}", file=sys.stderr)
    print(f"deploy checks: {passed} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        for f in failures:
            print(f"FAIL {f}", file=sys.stderr)
        print(f"FAIL a required field is missing or has the wrong shape: {type(e).__name__}: {e}", file=sys.stderr)
        print(f"deploy checks: {passed} passed, {len(failures) + 1} failed")
        sys.exit(1)
