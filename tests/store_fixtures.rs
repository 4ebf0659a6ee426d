//! Self-test of the object-store fixtures (`support::StoreServer`: Garage, Azurite,
//! fake-gcs-server): objects written and read through the fixture's helpers, a stop that refuses
//! connections and a restart that keeps the data, on each; and Garage's own key and setup.

mod support;

use std::io::ErrorKind;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::{Garage, StoreServer, on_each_store};

on_each_store!(serves_objects_and_survives_a_restart, two_run_side_by_side);

/// The port of `store`'s API, from what berth is given (`endpoint = "http://ADDR…"`).
fn api_addr(store: &dyn StoreServer) -> std::net::SocketAddr {
    let keys = store.berth_keys("p");
    let endpoint = keys
        .lines()
        .find_map(|l| l.strip_prefix("endpoint = \"http://"))
        .unwrap_or_else(|| panic!("no endpoint in {keys}"));
    let addr = endpoint.split(['/', '"']).next().unwrap_or_default();
    addr.parse().unwrap_or_else(|e| panic!("{addr}: {e}"))
}

fn serves_objects_and_survives_a_restart<S: StoreServer>() {
    let mut store = S::start();
    let served = store.requests_logged();
    // An empty bucket, then objects in and out.
    assert_eq!(store.list_keys(""), vec![]);
    assert_eq!(store.get_object("blobs/sha256/missing"), None);
    store.put_object("mirror/blobs/sha256/aa11", b"first".to_vec());
    store.put_object("mirror/blobs/sha256/ab22", vec![7u8; 100_000]);
    store.put_object(
        "mirror/manifests/docker.io/library/app/_tags/v1",
        b"{}".to_vec(),
    );
    assert_eq!(
        store.get_object("mirror/blobs/sha256/aa11").as_deref(),
        Some(&b"first"[..])
    );
    assert_eq!(
        store.list_keys(""),
        vec![
            ("mirror/blobs/sha256/aa11".to_owned(), 5),
            ("mirror/blobs/sha256/ab22".to_owned(), 100_000),
            (
                "mirror/manifests/docker.io/library/app/_tags/v1".to_owned(),
                2
            ),
        ]
    );
    // The prefix is a plain string prefix, not only whole path segments.
    assert_eq!(keys(&store, "mirror/blobs/sha256/a").len(), 2);
    assert_eq!(
        keys(&store, "mirror/blobs/sha256/ab"),
        ["mirror/blobs/sha256/ab22"]
    );
    assert_eq!(keys(&store, "mirror/blobs/").len(), 2);
    assert_eq!(keys(&store, "mirror/manifests/").len(), 1);
    assert_eq!(keys(&store, "other/").len(), 0);
    // Overwriting (how a test plants a damaged object), deleting.
    store.put_object("mirror/blobs/sha256/aa11", b"damaged!".to_vec());
    assert_eq!(
        store.get_object("mirror/blobs/sha256/aa11").as_deref(),
        Some(&b"damaged!"[..])
    );
    store.delete_object("mirror/manifests/docker.io/library/app/_tags/v1");
    assert_eq!(keys(&store, "mirror/manifests/").len(), 0);
    // The server logged each of those requests: 7 lists, 4 puts, 4 gets, 1 delete.
    assert_eq!(
        store.requests_logged() - served,
        16,
        "{}: requests logged",
        store.name()
    );

    // Down: the API port refuses connections.
    let addr = api_addr(&store);
    store.stop();
    let refused = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .expect_err("the port still accepts connections after stop()");
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused, "{refused}");

    // Up again on the same port, with the same data.
    let began = Instant::now();
    store.restart();
    eprintln!("{} restarted in {:.2?}", store.name(), began.elapsed());
    assert_eq!(api_addr(&store), addr);
    assert_eq!(
        store.get_object("mirror/blobs/sha256/aa11").as_deref(),
        Some(&b"damaged!"[..])
    );
    assert_eq!(
        store.get_object("mirror/blobs/sha256/ab22"),
        Some(vec![7u8; 100_000])
    );
    assert_eq!(keys(&store, "").len(), 2);
}

fn two_run_side_by_side<S: StoreServer>() {
    let a = S::start();
    let b = S::start();
    assert_ne!(api_addr(&a), api_addr(&b));
    a.put_object("only-in-a", b"a".to_vec());
    assert_eq!(b.get_object("only-in-a"), None);
    assert_eq!(a.list_keys("").len(), 1);
}

#[test]
fn garage_has_a_key_for_its_bucket() {
    let garage = Garage::start();
    eprintln!(
        "garage started and set up in {:.2?} at {} (key {})",
        garage.startup_time(),
        garage.endpoint(),
        garage.key_id()
    );
    assert!(garage.endpoint().starts_with("http://127.0.0.1:"));
    assert_eq!(garage.bucket(), "berth");
    assert_eq!(garage.region(), "garage");
    assert!(garage.key_id().starts_with("GK"), "{}", garage.key_id());
    assert_eq!(garage.secret().len(), 64, "{}", garage.secret());
    assert_eq!(
        std::fs::read_to_string(garage.secret_file())
            .unwrap()
            .trim(),
        garage.secret()
    );
    assert_eq!(
        std::fs::read_to_string(garage.key_id_file())
            .unwrap()
            .trim(),
        garage.key_id()
    );

    assert_eq!(api_addr(&garage), garage.s3_addr());
}

fn keys(store: &dyn StoreServer, prefix: &str) -> Vec<String> {
    store
        .list_keys(prefix)
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}
