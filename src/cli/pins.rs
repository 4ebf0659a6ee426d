//! `berth pin`, `berth unpin` and `berth cache prune`.

use std::process::ExitCode;

use crate::{AdminArgs, AdminClient, admin_session, human_bytes};

fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Pins (or, with `unpin`, unpins) images; exits non-zero naming each that failed to parse
/// or that the server refused.
pub fn pin(images: &[String], unpin: bool, admin: &AdminArgs) -> ExitCode {
    let mut query = Vec::new();
    for i in images {
        match i.parse::<berth::oci::ImageRef>() {
            Ok(r) => query.push(format!("image={}", enc(&r.to_string()))),
            Err(e) => {
                eprintln!("berth: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let Some((client, rt)) = admin_session(admin) else {
        return ExitCode::FAILURE;
    };
    let (path, key, verb) = if unpin {
        ("/admin/unpin", "unpinned", "unpinned")
    } else {
        ("/admin/pin", "pinned", "pinned")
    };
    let done = rt.block_on(client.call(
        reqwest::Method::POST,
        &format!("{path}?{}", query.join("&")),
    ));
    match done {
        Ok(v) => {
            let list = v[key].as_array().cloned().unwrap_or_default();
            for i in &list {
                println!("{verb} {}", i.as_str().unwrap_or(""));
            }
            for f in v["not_fetched"].as_array().cloned().unwrap_or_default() {
                eprintln!(
                    "berth: {}: pinned, not fetched now: {}",
                    f["image"].as_str().unwrap_or(""),
                    f["error"].as_str().unwrap_or("")
                );
            }
            if let Some(id) = v["warm"].as_u64() {
                println!("fetching the blobs in the background: GET /admin/warm/{id}");
            }
            if unpin && list.len() < images.len() {
                eprintln!(
                    "berth: {} of {} images were not pinned",
                    images.len() - list.len(),
                    images.len()
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("berth: {}: {e}", images.join(", "));
            ExitCode::FAILURE
        }
    }
}

pub async fn prune(client: &AdminClient, not_pulled_for: &str, dry_run: bool) -> ExitCode {
    if let Err(e) = humantime::parse_duration(not_pulled_for) {
        eprintln!("berth: --not-pulled-for {not_pulled_for:?} is not a duration like 30d: {e}");
        return ExitCode::FAILURE;
    }
    let path = format!(
        "/admin/cache/prune?not_pulled_for={}{}",
        enc(not_pulled_for),
        if dry_run { "&dry_run=true" } else { "" }
    );
    match client.call(reqwest::Method::POST, &path).await {
        Ok(v) => {
            let verb = if dry_run { "would remove" } else { "removed" };
            let list = |k: &str| v[k].as_array().cloned().unwrap_or_default();
            for i in list("images") {
                println!("{verb} image {}", i.as_str().unwrap_or(""));
            }
            for b in list("blobs") {
                println!("{verb} blob {}", b.as_str().unwrap_or(""));
            }
            println!(
                "{} freed{}",
                human_bytes(v["bytes_freed"].as_u64().unwrap_or(0)),
                if dry_run { " (dry run)" } else { "" }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("berth: cache prune: {e}");
            ExitCode::FAILURE
        }
    }
}
