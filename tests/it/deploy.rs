//! The deployment files in examples/deploy: the systemd unit passes `systemd-analyze verify` (with the built
//! binary in place of the installed one), the example configuration passes `easel config check`, and the
//! Dockerfile has the promised shape (multi-stage, static, unprivileged). Docker itself cannot build here: its base
//! images are not reachable, so the image build is not tested.

use std::path::Path;

const BIN: &str = env!("CARGO_BIN_EXE_easel");
const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/deploy");

#[test]
fn the_systemd_unit_verifies() {
    let Ok(analyze) = which("systemd-analyze") else {
        assert!(
            std::env::var_os("EASEL_SKIP_SYSTEMD").is_some(),
            "systemd-analyze is not installed (apt-get install systemd), or set EASEL_SKIP_SYSTEMD=1"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(Path::new(DEPLOY).join("easel.service")).unwrap();
    assert!(
        unit.contains("DynamicUser=yes") && unit.contains("ReadWritePaths=/var/lib/easel"),
        "hardened as documented"
    );
    let path = dir.path().join("easel.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/easel", BIN)).unwrap();
    let out = std::process::Command::new(analyze).args(["verify", "--man=no"]).arg(&path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    // Only problems with this unit count (a container's own units may be reported too).
    let ours: Vec<&str> = text.lines().filter(|l| l.contains("easel.service")).collect();
    assert!(out.status.success() && ours.is_empty(), "{text}");
}

#[test]
fn the_example_configuration_checks() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = std::fs::read_to_string(Path::new(DEPLOY).join("easel.yaml")).unwrap().replace(
        "/etc/easel/workflows/comfyui-sdxl.json",
        concat!(env!("CARGO_MANIFEST_DIR"), "/examples/workflows/comfyui-sdxl.json"),
    );
    let path = dir.path().join("easel.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = std::process::Command::new(BIN).args(["config", "check", "--config"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_dockerfile_is_multi_stage_static_and_unprivileged() {
    let file = std::fs::read_to_string(Path::new(DEPLOY).join("Dockerfile")).unwrap();
    assert_eq!(file.lines().filter(|l| l.starts_with("FROM ")).count(), 2, "{file}");
    assert!(file.contains("x86_64-unknown-linux-musl") && file.contains("FROM scratch"));
    assert!(file.lines().any(|l| l.starts_with("USER ") && !l.contains(" 0")));
    assert!(file.contains("--locked"), "builds from Cargo.lock");
    let ignore = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.dockerignore")).unwrap();
    assert!(ignore.lines().any(|l| l.trim() == "target"), "the build context leaves out target/");
}

fn which(name: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|f| f.is_file()))
        .ok_or(())
}
