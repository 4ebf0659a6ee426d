//! Every example config shipped in config/ is valid, and `berth check-config` agrees.

use std::collections::BTreeSet;
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
        // The examples name secrets mounted where berth runs, not here: the file alone.
        let out = Command::new(env!("CARGO_BIN_EXE_berth"))
            .args(["check-config", "--no-files"])
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

/// config/berth.toml with every commented-out key and section uncommented: `# key = value`
/// and `# [section]` lines lose their `# `; prose comments stay comments.
fn example_uncommented() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/berth.toml");
    let text = std::fs::read_to_string(path).expect("read config/berth.toml");
    let is_key = |s: &str| {
        let name = s.split('=').next().unwrap_or("").trim();
        s.contains('=')
            && !name.is_empty()
            && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
    };
    text.lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(rest) if rest.starts_with('[') || is_key(rest) => rest,
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The keys `Config` accepts in the table at `path` of `doc`, as its own unknown-key error lists
/// them (so the list comes from the code, not from this test).
fn accepted_keys(doc: &toml::Table, path: &[String]) -> BTreeSet<String> {
    let mut doc = doc.clone();
    let mut table = &mut doc;
    for seg in path {
        // "key" or "key#index" (an element of an array).
        let (key, index) = match seg.split_once('#') {
            Some((k, i)) => (k, i.parse::<usize>().ok()),
            None => (seg.as_str(), None),
        };
        let mut value = table.get_mut(key);
        if let Some(i) = index {
            value = value.and_then(|v| v.as_array_mut()?.get_mut(i));
        }
        table = value
            .and_then(toml::Value::as_table_mut)
            .unwrap_or_else(|| panic!("no table at {path:?}"));
    }
    table.insert("zz_not_a_key".into(), toml::Value::Boolean(true));
    let text = toml::to_string(&doc).expect("serialize");
    let err = match toml::from_str::<berth::config::Config>(&text) {
        Ok(_) => panic!("an unknown key at {path:?} was accepted"),
        Err(e) => e.message().to_owned(),
    };
    assert!(
        err.contains("zz_not_a_key"),
        "{path:?}: unexpected error {err}"
    );
    let expected = err.split_once("expected").map_or("", |(_, s)| s);
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// Tables whose keys are the user's own (header names), not keys of `Config`: `(parent, key)`,
/// the parent as the array it is an element of.
const FREE_FORM_TABLES: [(&str, &str); 1] = [("notify", "headers")];

fn is_free_form(path: &[String], key: &str) -> bool {
    let parent = path
        .last()
        .map(|p| p.split_once('#').map_or(p.as_str(), |(k, _)| k));
    FREE_FORM_TABLES
        .iter()
        .any(|&(p, k)| parent == Some(p) && key == k)
}

/// Walks the uncommented example: at every table, the keys shown must be exactly the keys
/// `Config` accepts there.
fn compare_keys(doc: &toml::Table, path: &mut Vec<String>, table: &toml::Table, n: &mut usize) {
    let shown: BTreeSet<String> = table.keys().cloned().collect();
    let accepted = accepted_keys(doc, path);
    assert_eq!(
        shown,
        accepted,
        "config/berth.toml at [{}]: keys shown (left) differ from the keys Config accepts (right)",
        path.join(".")
    );
    *n += 1;
    for (k, v) in table {
        match v {
            toml::Value::Table(_) if is_free_form(path, k) => {}
            toml::Value::Table(t) => {
                path.push(k.clone());
                compare_keys(doc, path, t, n);
                path.pop();
            }
            toml::Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let toml::Value::Table(t) = item {
                        path.push(format!("{k}#{i}"));
                        compare_keys(doc, path, t, n);
                        path.pop();
                    }
                }
            }
            _ => {}
        }
    }
}

#[test]
fn the_example_shows_every_key_config_accepts() {
    let text = example_uncommented();
    let doc: toml::Table = toml::from_str(&text).expect("uncommented example is TOML");
    // Every key shown is accepted with a value of the right type.
    toml::from_str::<berth::config::Config>(&text)
        .unwrap_or_else(|e| panic!("uncommented config/berth.toml: {e}"));
    let mut tables = 0;
    compare_keys(&doc, &mut Vec::new(), &doc, &mut tables);
    // server, server.tls, cache, cache.object_store, log, registry, its route and the route's
    // endpoint table, cluster, auth, auth.rule, admin, hosted, notify, and the top level.
    assert!(tables >= 15, "only {tables} tables compared");
    for section in ["admin", "hosted", "notify"] {
        assert!(
            doc.contains_key(section),
            "config/berth.toml does not document [{section}]"
        );
    }
}

/// A config with every section present and only its required keys set.
const REQUIRED_ONLY: &str = r#"
[server.tls]
cert = "c"
key = "k"
[cache.object_store]
url = "s3://bucket"
[auth]
htpasswd = "h"
[[auth.rule]]
users = ["u"]
allow = ["a"]
[[registry]]
name = "r"
endpoints = ["http://r"]
[[registry.route]]
match = "m"
endpoints = ["http://r"]
[cluster]
peers = ["http://p:5000"]
[admin]
[[hosted]]
name = "h"
[[notify]]
url = "http://n"
"#;

/// Shown values that are examples, not defaults, each said so by its comment in the file.
const NOT_DEFAULTS: [&str; 2] = ["registry.default", "hosted.repositories"];

/// Every key of `defaults` (what Config fills in) that the example shows must show that value.
fn compare_defaults(
    path: &str,
    example: &toml::Table,
    defaults: &toml::Table,
    required: Option<&toml::Table>,
    checked: &mut Vec<String>,
) {
    for (k, want) in defaults {
        let key = if path.is_empty() {
            k.clone()
        } else {
            format!("{path}.{k}")
        };
        let Some(shown) = example.get(k) else {
            continue;
        };
        let req = required.and_then(|r| r.get(k));
        let is_tables = |v: &toml::Value| {
            v.is_table()
                || v.as_array()
                    .is_some_and(|a| a.first().is_some_and(toml::Value::is_table))
        };
        match (shown, want) {
            // Required keys have no default: the example shows a value of its own.
            _ if req.is_some_and(|r| !is_tables(r)) => {}
            (toml::Value::Table(s), toml::Value::Table(w)) => {
                compare_defaults(&key, s, w, req.and_then(toml::Value::as_table), checked)
            }
            (toml::Value::Array(s), toml::Value::Array(w)) if is_tables(want) => {
                let req = req.and_then(|r| r.as_array()?.first()?.as_table());
                for s in s.iter().filter_map(toml::Value::as_table) {
                    let w = w[0].as_table().expect("table");
                    compare_defaults(&key, s, w, req, checked);
                }
            }
            _ if NOT_DEFAULTS.contains(&key.as_str()) => {
                assert_ne!(
                    shown, want,
                    "{key} is listed as not a default, but shows it"
                );
            }
            _ => {
                assert_eq!(
                    shown, want,
                    "config/berth.toml shows {key} = {shown}, the default is {want}"
                );
                checked.push(key);
            }
        }
    }
}

#[test]
fn the_example_shows_the_true_defaults() {
    use berth::config::Config;
    let required: toml::Table = toml::from_str(REQUIRED_ONLY).expect("TOML");
    let defaults: Config = toml::from_str(REQUIRED_ONLY).expect("required keys suffice");
    let defaults = toml::Table::try_from(&defaults).expect("serialize");
    // The example, through Config and back, so "600s" and "10m", 0 and 0.0 compare equal.
    let example: Config = toml::from_str(&example_uncommented()).expect("example parses");
    let example = toml::Table::try_from(&example).expect("serialize");
    let mut checked = Vec::new();
    compare_defaults("", &example, &defaults, Some(&required), &mut checked);
    for key in [
        "cache.dir",
        "cache.max_size",
        "server.max_connections_per_client",
        "auth.token_ttl",
        "registry.insecure",
        "cache.object_store.read_timeout",
        "auth.rule.actions",
        "hosted.delete",
        "hosted.upload_ttl",
        "hosted.gc_grace",
        "notify.events",
        "notify.timeout",
        "notify.retries",
        "notify.queue",
    ] {
        assert!(
            checked.iter().any(|k| k == key),
            "{key} was not compared: {checked:?}"
        );
    }
}

/// Runs `berth check-config` on `text` (written to a file in `dir`) with `env` set; returns
/// whether it succeeded and everything it printed.
fn check_config(dir: &std::path::Path, text: &str, env: &[(&str, &str)]) -> (bool, String) {
    let path = dir.join("berth.toml");
    std::fs::write(&path, text).expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .arg("check-config")
        .arg(&path)
        .env_remove("BERTH_TEST_UNSET")
        .envs(env.iter().copied())
        .output()
        .expect("run berth check-config");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), printed)
}

const SECRET: &str = "hunter2";

#[test]
fn secrets_are_never_printed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let reg = "[[registry]]\nname = \"a\"\n";
    let bad = [
        (
            format!("{reg}endpoints = [\"http://a\"]\npassword = \"{SECRET}\"\n"),
            "registry.password",
        ),
        (
            format!("password = \"{SECRET}\"\n{reg}endpoints = [\"http://a\"]\n"),
            "password",
        ),
        (
            format!("{reg}endpoints = [{{ url = \"http://a\", password = \"{SECRET}\" }}]\n"),
            "registry.endpoints",
        ),
        (
            format!("{reg}endpoints = [\"https://me:{SECRET}@a\"]\n"),
            "registry[0].endpoints[0]",
        ),
        (
            format!("{reg}endpoints = [\"http://a\"]\nfallback = [\"ftp://me:{SECRET}@a\"]\n"),
            "registry[0].fallback[0]",
        ),
        (
            format!("{reg}endpoints = [\"http://me:{SECRET}@\"]\n"),
            "registry.endpoints",
        ),
        (
            format!(
                "{reg}endpoints = [\"http://a\"]\n[cluster]\npeers = [\"http://me:{SECRET}@p:5000\"]\n"
            ),
            "cluster.peers[0]",
        ),
        (
            format!(
                "{reg}endpoints = [\"http://a\"]\n[cluster]\ndns = \"http://me:{SECRET}@p:5000\"\n"
            ),
            "cluster.dns",
        ),
        (
            format!(
                "{reg}endpoints = [\"http://a\"]\n[cluster]\ndns = \"http://me:{SECRET}@[::1\"\n"
            ),
            "cluster.dns",
        ),
        (
            format!(
                "[cache.object_store]\nurl = \"s3://b\"\nendpoint = \"ftp://me:{SECRET}@s3\"\n{reg}endpoints = [\"http://a\"]\n"
            ),
            "cache.object_store.endpoint",
        ),
        (
            format!(
                "[cache.object_store]\nurl = \"s3://b\"\nendpoint = \"https://me:{SECRET}@s3\"\n{reg}endpoints = [\"http://a\"]\n"
            ),
            "cache.object_store.endpoint",
        ),
        (
            format!(
                "[cache.object_store]\nurl = \"s3://key:{SECRET}@b\"\n{reg}endpoints = [\"http://a\"]\n"
            ),
            "cache.object_store.url",
        ),
    ];
    for (text, key) in &bad {
        let err = berth::config::Config::parse(text)
            .expect_err(text)
            .to_string();
        assert!(
            !err.contains(SECRET),
            "{text:?}: the error shows the secret: {err}"
        );
        assert!(
            err.contains(key),
            "{text:?}: the error does not name {key}: {err}"
        );
        let (ok, printed) = check_config(dir.path(), text, &[]);
        assert!(!ok, "{text:?} was accepted");
        assert!(
            !printed.contains(SECRET),
            "check-config shows the secret: {printed}"
        );
        assert!(
            printed.contains(key),
            "check-config does not name {key}: {printed}"
        );
    }
    // Good configs whose passwords come from a file and a variable: the effective config
    // printed holds their sources, not the secret.
    let file = dir.path().join("password");
    std::fs::write(&file, SECRET).expect("write password");
    let good = [
        format!(
            "{reg}endpoints = [\"http://a\"]\nusername = \"me\"\npassword_file = {:?}\n",
            file
        ),
        format!(
            "{reg}endpoints = [\"http://a\"]\nusername = \"me\"\npassword_env = \"BERTH_TEST_PW\"\n"
        ),
    ];
    for text in &good {
        let (ok, printed) = check_config(dir.path(), text, &[("BERTH_TEST_PW", SECRET)]);
        assert!(ok, "{text:?}: {printed}");
        assert!(
            !printed.contains(SECRET),
            "check-config shows the secret: {printed}"
        );
    }
}

#[test]
fn check_config_checks_the_files_the_config_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let missing = d.join("missing").display().to_string();
    let short = d.join("short");
    std::fs::write(&short, "too short").expect("write");
    let htpasswd = d.join("htpasswd");
    std::fs::write(&htpasswd, "me:$2y$05$abcdefghijklmnopqrstuv\n").expect("write");
    let not_bcrypt = d.join("htpasswd-md5");
    std::fs::write(&not_bcrypt, "me:$apr1$xyz\n").expect("write");
    let reg = "[[registry]]\nname = \"a\"\nendpoints = [\"http://a\"]\n";
    let user = "username = \"me\"\n";
    let cases = [
        (
            format!("{reg}{user}password_env = \"BERTH_TEST_UNSET\"\n"),
            "registry[0].password_env",
        ),
        (
            format!("{reg}{user}password_file = {missing:?}\n"),
            "registry[0].password_file",
        ),
        (
            format!("{reg}ca_file = {missing:?}\n"),
            "registry[0].ca_file",
        ),
        (
            format!("[server.tls]\ncert = {missing:?}\nkey = {missing:?}\n{reg}"),
            "server.tls.cert",
        ),
        (
            format!("[server.tls]\ncert = {short:?}\nkey = {missing:?}\n{reg}"),
            "server.tls.key",
        ),
        (
            format!(
                "[server.tls]\ncert = {short:?}\nkey = {short:?}\nclient_ca = {missing:?}\n{reg}"
            ),
            "server.tls.client_ca",
        ),
        (
            format!("[auth]\nhtpasswd = {missing:?}\n{reg}"),
            "auth.htpasswd",
        ),
        (
            format!("[auth]\nhtpasswd = {not_bcrypt:?}\n{reg}"),
            "auth.htpasswd",
        ),
        (
            format!("[auth]\nhtpasswd = {htpasswd:?}\ntoken_key_file = {short:?}\n{reg}"),
            "auth.token_key_file",
        ),
        (
            format!(
                "[cache.object_store]\nurl = \"s3://b\"\naccess_key_id_env = \"BERTH_TEST_UNSET\"\nsecret_access_key_file = {missing:?}\n{reg}"
            ),
            "cache.object_store.access_key_id_env",
        ),
        (
            format!(
                "[cache.object_store]\nurl = \"s3://b\"\naccess_key_id_file = {short:?}\nsecret_access_key_file = {missing:?}\n{reg}"
            ),
            "cache.object_store.secret_access_key_file",
        ),
        (
            format!("{reg}[cluster]\npeers = [\"http://p:5000\"]\nca_file = {missing:?}\n"),
            "cluster.ca_file",
        ),
        (
            format!("[server]\nlisten = \"0.0.0.0:5000\"\nadmin_listen = \"0.0.0.0:5000\"\n{reg}"),
            "server.admin_listen",
        ),
        (
            format!(
                "[server]\nlisten = \"127.0.0.1:5000\"\nadmin_listen = \"0.0.0.0:5000\"\n{reg}"
            ),
            "server.admin_listen",
        ),
    ];
    for (text, key) in &cases {
        let (ok, printed) = check_config(d, text, &[]);
        assert!(!ok, "{text:?} passed check-config: {printed}");
        assert!(
            printed.contains(key),
            "{text:?}: the error does not name {key}: {printed}"
        );
        assert!(!printed.contains("config file"), "{text:?}: {printed}");
    }
    // The same files present: it passes.
    let (ok, printed) = check_config(
        d,
        &format!("[auth]\nhtpasswd = {htpasswd:?}\n{reg}{user}password_env = \"BERTH_TEST_PW\"\n"),
        &[("BERTH_TEST_PW", "x")],
    );
    assert!(ok, "{printed}");
}

#[test]
fn help_describes_every_argument() {
    let help = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_berth"))
            .args(args)
            .arg("--help")
            .output()
            .expect("run berth --help");
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let serve = help(&["serve"]);
    let line = serve
        .lines()
        .find(|l| l.trim_start().starts_with("-c, --config"))
        .unwrap_or_else(|| panic!("no --config in {serve}"));
    assert!(
        line.contains("config file"),
        "--config undescribed: {serve}"
    );
    let check = help(&["check-config"]);
    let line = check
        .lines()
        .find(|l| l.trim_start().starts_with("<FILE>"))
        .unwrap_or_else(|| panic!("no <FILE> in {check}"));
    assert!(line.contains("config file"), "<FILE> undescribed: {check}");
    let line = check
        .lines()
        .find(|l| l.trim_start().starts_with("--no-files"))
        .unwrap_or_else(|| panic!("no --no-files in {check}"));
    assert!(
        line.contains("config file alone"),
        "--no-files undescribed: {check}"
    );
}
