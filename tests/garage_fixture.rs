//! Self-test of the Garage fixture (`support::Garage`): a real single-node Garage S3 store,
//! objects written and read through the fixture's helpers, a stop that refuses connections and
//! a restart that keeps the data.

mod support;

use std::io::ErrorKind;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::{Garage, StoreServer};

#[test]
fn garage_serves_objects_and_survives_a_restart() {
    let mut garage = Garage::start();
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

    // An empty bucket, then objects in and out.
    assert_eq!(garage.list_keys(""), vec![]);
    assert_eq!(garage.get_object("blobs/sha256/missing"), None);
    garage.put_object("mirror/blobs/sha256/aa11", b"first".to_vec());
    garage.put_object("mirror/blobs/sha256/ab22", vec![7u8; 100_000]);
    garage.put_object(
        "mirror/manifests/docker.io/library/app/_tags/v1",
        b"{}".to_vec(),
    );
    assert_eq!(
        garage.get_object("mirror/blobs/sha256/aa11").as_deref(),
        Some(&b"first"[..])
    );
    assert_eq!(
        garage.list_keys(""),
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
    assert_eq!(keys(&garage, "mirror/blobs/sha256/a").len(), 2);
    assert_eq!(
        keys(&garage, "mirror/blobs/sha256/ab"),
        ["mirror/blobs/sha256/ab22"]
    );
    assert_eq!(keys(&garage, "mirror/blobs/").len(), 2);
    assert_eq!(keys(&garage, "mirror/blobs").len(), 2);
    assert_eq!(keys(&garage, "mirror/manifests/").len(), 1);
    assert_eq!(keys(&garage, "other/").len(), 0);
    // Overwriting (how a test plants a corrupt object).
    garage.put_object("mirror/blobs/sha256/aa11", b"corrupt!".to_vec());
    assert_eq!(
        garage.get_object("mirror/blobs/sha256/aa11").as_deref(),
        Some(&b"corrupt!"[..])
    );
    garage.delete_object("mirror/manifests/docker.io/library/app/_tags/v1");
    assert_eq!(keys(&garage, "mirror/manifests/").len(), 0);

    // Down: the S3 port refuses connections.
    garage.stop();
    assert!(!garage.is_running());
    let refused = TcpStream::connect_timeout(&garage.s3_addr(), Duration::from_secs(2))
        .expect_err("garage's S3 port still accepts connections after stop()");
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused, "{refused}");

    // Up again on the same endpoint, with the same data and key.
    let endpoint = garage.endpoint();
    let began = Instant::now();
    garage.restart();
    eprintln!("garage restarted in {:.2?}", began.elapsed());
    assert_eq!(garage.endpoint(), endpoint);
    assert_eq!(
        garage.get_object("mirror/blobs/sha256/aa11").as_deref(),
        Some(&b"corrupt!"[..])
    );
    assert_eq!(
        garage.get_object("mirror/blobs/sha256/ab22"),
        Some(vec![7u8; 100_000])
    );
    assert_eq!(keys(&garage, "").len(), 2);
}

#[test]
fn two_garages_run_side_by_side() {
    let a = Garage::start();
    let b = Garage::start();
    assert_ne!(a.endpoint(), b.endpoint());
    a.put_object("only-in-a", b"a".to_vec());
    assert_eq!(b.get_object("only-in-a"), None);
    assert_eq!(a.list_keys("").len(), 1);
}

fn keys(garage: &Garage, prefix: &str) -> Vec<String> {
    garage
        .list_keys(prefix)
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}
