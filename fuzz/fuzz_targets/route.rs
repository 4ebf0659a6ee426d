//! Request routing: never panics, and never an open proxy. Every route that names a target
//! names a configured registry and a valid repository name; `?ns=` is honoured exactly.
//!
//! Input: a request target as it appears in the request line, `PATH[?QUERY]`.
#![no_main]

use std::sync::Arc;
use std::sync::OnceLock;

use berth::oci::RepoName;
use berth::route::{Route, Router, ns_param};
use libfuzzer_sys::fuzz_target;

const REGISTRIES: [&str; 4] = ["docker.io", "ghcr.io", "127.0.0.1:5001", "registry.local:5000"];

struct Routers {
    with_default: Router,
    without_default: Router,
}

fn routers() -> &'static Routers {
    static R: OnceLock<Routers> = OnceLock::new();
    R.get_or_init(|| {
        let regs: Vec<Arc<str>> = REGISTRIES.iter().map(|r| Arc::from(*r)).collect();
        Routers {
            with_default: Router::new(regs.clone(), Some(Arc::from("docker.io"))),
            without_default: Router::new(regs, None),
        }
    })
}

fn check(router: &Router, has_default: bool, path: &str, ns: Option<&str>) {
    let Ok(route) = router.route(path, ns) else {
        return;
    };
    let target = match &route {
        // Every route that carries a Target must be listed here.
        Route::Manifest { target, .. }
        | Route::Blob { target, .. }
        | Route::Tags { target }
        | Route::Uploads { target }
        | Route::Upload { target, .. }
        | Route::Referrers { target, .. } => target,
        Route::Catalog { registry } => {
            // None: the catalog of the default (and any hosted) registry, named by no one.
            if let Some(registry) = registry {
                assert!(REGISTRIES.contains(&&**registry), "{path:?} ns={ns:?}: catalog of {registry:?}");
            }
            return;
        }
        // Ping, Token and anything newer that names no repository.
        _ => return,
    };
    let registry = &*target.registry;
    let repo = target.repo.as_str();
    assert!(
        REGISTRIES.contains(&registry),
        "OPEN PROXY: {path:?} ns={ns:?} routed to unconfigured registry {registry:?}"
    );
    assert_eq!(
        repo.parse::<RepoName>().as_ref(),
        Ok(&target.repo),
        "{path:?} ns={ns:?}: repo {repo:?} is not a valid RepoName"
    );
    if let Some(ns) = ns {
        assert_eq!(registry, ns, "{path:?}: ?ns={ns:?} not honoured");
    } else if !has_default || registry != "docker.io" {
        // Without ?ns= and the default, the path itself must name the registry.
        let named = path
            .strip_prefix("/v2/")
            .is_some_and(|rest| rest.starts_with(&format!("{registry}/")));
        assert!(named, "{path:?}: registry {registry:?} named by neither ?ns= nor the path");
    }
    if registry == "docker.io" {
        assert!(repo.contains('/'), "{path:?}: Docker Hub repo {repo:?} lacks library/");
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    // Split the request target the way the server does.
    let (path, query) = match s.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (s, None),
    };
    let ns = ns_param(query);
    let r = routers();
    check(&r.with_default, true, path, ns);
    check(&r.without_default, false, path, ns);
    // Token scopes name a repository without ?ns=: each candidate must be a configured registry.
    for router in [&r.with_default, &r.without_default] {
        for t in router.targets_for_name(path) {
            assert!(
                REGISTRIES.contains(&&*t.registry),
                "OPEN PROXY: targets_for_name({path:?}) gave {:?}",
                t.registry
            );
            assert_eq!(
                t.repo.as_str().parse::<RepoName>().as_ref(),
                Ok(&t.repo),
                "targets_for_name({path:?}): invalid repo"
            );
        }
    }
});
