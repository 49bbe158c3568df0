//! `scripts/k8s-job.sh` as an operator meets it, against a stand-in `kubectl` that plays a
//! cluster: a one-off Job whose pod cannot start yet (a ReadWriteOnce volume still attached to
//! the hourly sync's pod on another node: `Multi-Attach error`, `ContainerCreating`).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn script(dir: &Path, name: &str, body: &str) {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/usr/bin/env bash\n{body}")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A pod that is still waiting for its volume when the script stops waiting is not a billsync
/// failure: the Job is still there and runs once the volume is free (a replay that then sends
/// records). The script says so, with how to follow or delete the Job, and exits with a code
/// billsync never uses instead of 1 ("a runtime failure"). How long it waits is an option.
#[test]
fn a_pod_that_has_not_started_in_time_is_reported_as_a_job_that_may_still_run() {
    let bin = tempfile::tempdir().unwrap();
    let calls = bin.path().join("calls.log");
    script(
        bin.path(),
        "kubectl",
        &format!(
            r#"echo "$*" >> {calls}
case "$*" in
  *"patch --local"*) echo "kind: Job" ;;
  *"create -f -"*) cat > /dev/null ;;
  *"status.phase"*) echo Pending ;;
  *"logs -f"*) echo 'container "billsync" in pod is waiting to start: ContainerCreating' >&2; exit 1 ;;
  *) echo "" ;;
esac
"#,
            calls = calls.display()
        ),
    );
    // Time passes quickly in this cluster.
    script(bin.path(), "sleep", "exec /bin/sleep 0.05\n");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let started = std::time::Instant::now();
    let out = Command::new("bash")
        .arg(root.join("scripts/k8s-job.sh"))
        .args([
            "-n",
            "billing",
            "--image",
            "registry.example.com/billing/billsync:0.1.0",
            "--start-timeout",
            "2",
            "replay",
            "--status",
            "unmapped",
            "--reason",
            "rule added",
        ])
        .env(
            "PATH",
            format!(
                "{}:{}",
                bin.path().display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(124), "{stderr}");
    assert!(
        stderr.contains("has not started") && stderr.contains("may still run"),
        "{stderr}"
    );
    assert!(stderr.contains("kubectl -n billing delete job"), "{stderr}");
    assert!(!stderr.contains("unknown code"), "{stderr}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "waited {:?}",
        started.elapsed()
    );
    let calls = std::fs::read_to_string(&calls).unwrap();
    assert!(
        calls.contains("rule added"),
        "the Job got the arguments: {calls}"
    );
    assert!(
        !calls.contains("logs -f"),
        "no logs are followed of a pod that never started: {calls}"
    );
}
