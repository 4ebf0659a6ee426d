//! Every example config shipped in config/ is valid, and `berth check-config` agrees.

use std::process::Command;

#[test]
fn every_example_config_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("config/ exists") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        berth::config::Config::load(&path)
            .unwrap_or_else(|e| panic!("{} is invalid: {e}", path.display()));
        let out = Command::new(env!("CARGO_BIN_EXE_berth"))
            .arg("check-config")
            .arg(&path)
            .output()
            .expect("run berth check-config");
        assert!(
            out.status.success(),
            "check-config {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        n += 1;
    }
    assert!(n >= 5, "expected the example configs, found {n}");
}

#[test]
fn check_config_names_the_bad_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[cache]\nmax_sise = \"1GiB\"\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("run berth check-config");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_sise"));
}
