//! The config parser: never panics on any text, and a config it accepts prints (`check-config`)
//! to TOML that parses again to the same values.
//!
//! Each input is used twice: as a whole config file, and (since byte mutations of a whole file
//! mostly break its TOML syntax) line by line as the values of a valid skeleton, in order:
//! max_size, tag_ttl, shutdown_grace, listen, registry name, endpoint URL, a second registry
//! name, read_timeout. A line of only digits becomes a TOML integer, any other a string.
#![no_main]

use berth::config::Config;
use libfuzzer_sys::fuzz_target;

fn check(text: &str) {
    let Ok(c) = Config::parse(text) else {
        return;
    };
    let printed = c.to_toml();
    let again = match Config::parse(&printed) {
        Ok(a) => a,
        Err(e) => panic!("{text:?}: printed config does not parse: {e}\n{printed}"),
    };
    let ctx = || format!("input:\n{text}\nprinted:\n{printed}");
    assert_eq!(again.server.listen, c.server.listen, "{}", ctx());
    assert_eq!(again.server.admin_listen, c.server.admin_listen, "{}", ctx());
    assert_eq!(again.server.shutdown_grace, c.server.shutdown_grace, "{}", ctx());
    assert_eq!(again.server.header_read_timeout, c.server.header_read_timeout, "{}", ctx());
    assert_eq!(again.cache.dir, c.cache.dir, "{}", ctx());
    assert_eq!(again.cache.max_size, c.cache.max_size, "{}", ctx());
    assert_eq!(again.cache.tag_ttl, c.cache.tag_ttl, "{}", ctx());
    assert_eq!(again.log.format, c.log.format, "{}", ctx());
    assert_eq!(again.registries.len(), c.registries.len(), "{}", ctx());
    for (a, b) in again.registries.iter().zip(&c.registries) {
        assert_eq!(a.name, b.name, "{}", ctx());
        assert_eq!(a.default, b.default, "{}", ctx());
        // berth uses an endpoint as its URL without trailing slashes (upstream/endpoints.rs),
        // and check-config prints it so: compare what berth uses.
        assert_eq!(a.endpoints.len(), b.endpoints.len(), "{}", ctx());
        for (x, y) in a.endpoints.iter().zip(&b.endpoints) {
            assert_eq!(
                x.url.as_str().trim_end_matches('/'),
                y.url.as_str().trim_end_matches('/'),
                "{}",
                ctx()
            );
            assert_eq!(x.mirror, y.mirror, "{}", ctx());
            assert_eq!(x.connect_timeout, y.connect_timeout, "{}", ctx());
            assert_eq!(x.read_timeout, y.read_timeout, "{}", ctx());
        }
        assert_eq!(a.username, b.username, "{}", ctx());
        assert_eq!(a.password_file, b.password_file, "{}", ctx());
        assert_eq!(a.password_env, b.password_env, "{}", ctx());
        assert_eq!(a.connect_timeout, b.connect_timeout, "{}", ctx());
        assert_eq!(a.read_timeout, b.read_timeout, "{}", ctx());
    }
}

/// A TOML value for `s`: an integer when it is one, else a basic string.
fn value(s: &str) -> String {
    if !s.is_empty() && s.len() < 20 && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.to_owned();
    }
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn skeleton(text: &str) -> String {
    let mut v = text.split('\n');
    let mut next = |default: &str| value(v.next().unwrap_or(default));
    let (max_size, tag_ttl, grace, listen) =
        (next("1GiB"), next("10m"), next("10s"), next("127.0.0.1:5000"));
    let (name, endpoint, name2, read_timeout) =
        (next("docker.io"), next("https://registry-1.docker.io"), next("ghcr.io"), next("30s"));
    format!(
        "[server]\nlisten = {listen}\nshutdown_grace = {grace}\n\
         [cache]\ndir = \"/tmp/berth\"\nmax_size = {max_size}\ntag_ttl = {tag_ttl}\n\
         [[registry]]\nname = {name}\ndefault = true\nendpoints = [{endpoint}]\n\
         read_timeout = {read_timeout}\n\
         [[registry]]\nname = {name2}\nendpoints = [{{ url = {endpoint}, mirror = true }}]\n"
    )
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    check(text);
    if text.len() < 1024 {
        check(&skeleton(text));
    }
});
