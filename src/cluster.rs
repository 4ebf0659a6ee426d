//! Replicas of one deployment: who the peers are, which are alive, and which one owns a blob.
//!
//! Every blob digest has an owner among the live replicas by rendezvous hashing (the peer with
//! the highest `sha256(peer key, digest)`), so all replicas agree on it without talking, and
//! when the owner dies only its blobs move, to the next replica in the same order. A replica
//! that misses a blob asks the owner (an ordinary registry request marked with
//! [`PEER_HEADER`]); the owner fills it from upstream once and streams it to every waiter.
//!
//! Peers are found from the configured list or by resolving a DNS name (a headless Service),
//! probed on `GET /_berth/peer`, which answers the replica's random instance id — that is how a
//! replica recognizes itself in the list.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::RwLock;

use http::{HeaderValue, StatusCode, header};
use sha2::{Digest as _, Sha256};

use crate::config::ClusterConfig;
use crate::error::SetupError;
use crate::metrics::{Metrics, PeerResult};
use crate::oci::Digest;
use crate::route::Target;

/// Marks a request from a replica to a blob's owner: the owner serves it itself, never
/// forwarding it again. Its value is the asking replica's instance id.
pub const PEER_HEADER: &str = "x-berth-peer";
/// The path a replica answers its instance id on.
pub const ID_PATH: &str = "/_berth/peer";

pub struct Peer {
    /// `scheme://host:port`, the key all replicas hash on.
    pub base: String,
    /// Where requests go: `base`, or `https://<server_name>:port` pinned to the peer's address.
    target: String,
    client: reqwest::Client,
    up: AtomicBool,
    is_self: AtomicBool,
}

impl Peer {
    pub fn is_self(&self) -> bool {
        self.is_self.load(Ordering::Relaxed)
    }
}

/// Why a peer did not serve a blob.
#[derive(Debug)]
pub enum PeerError {
    /// No answer (refused, timed out, reset): the peer is marked down; ask the next one.
    Unreachable(String),
    /// The peer answered with an error status.
    Status(StatusCode),
}

pub struct Cluster {
    id: String,
    config: ClusterConfig,
    roots: Vec<reqwest::Certificate>,
    /// The client certificate sent to peers (`client_cert`, `client_key`).
    identity: Option<reqwest::Identity>,
    peers: RwLock<Vec<Arc<Peer>>>,
    /// The peers' addresses, so their requests are not rate-limited as a client's.
    peer_ips: RwLock<HashSet<IpAddr>>,
    /// Set once the first round of probes ended (the owner order means something from then on).
    probed: AtomicBool,
    metrics: Arc<Metrics>,
}

fn score(peer: &str, digest: &Digest) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(peer.as_bytes());
    h.update(b"\n");
    h.update(digest.to_string().as_bytes());
    h.finalize().into()
}

impl Cluster {
    pub fn new(config: &ClusterConfig, metrics: Arc<Metrics>) -> Result<Cluster, SetupError> {
        let roots = match &config.ca_file {
            Some(path) => {
                let pem = std::fs::read(path)
                    .map_err(|e| SetupError::file("cluster.ca_file", path, e))?;
                reqwest::Certificate::from_pem_bundle(&pem)
                    .map_err(|e| SetupError::file("cluster.ca_file", path, e))?
            }
            None => Vec::new(),
        };
        let identity = match (&config.client_cert, &config.client_key) {
            (Some(cert), Some(key)) => Some(
                config
                    .client_identity(cert, key)
                    .map_err(|e| SetupError::new("cluster.client_cert", e))?,
            ),
            _ => None,
        };
        let id = format!("{:032x}", rand::random::<u128>());
        metrics.enable_cluster();
        let mut cluster = Cluster {
            id,
            config: config.clone(),
            roots,
            identity,
            peers: RwLock::new(Vec::new()),
            peer_ips: RwLock::new(HashSet::new()),
            probed: AtomicBool::new(false),
            metrics,
        };
        let peers = config
            .peers
            .iter()
            .map(|u| cluster.new_peer(u.as_str().trim_end_matches('/')))
            .collect::<Result<Vec<_>, _>>()?;
        cluster.peers = RwLock::new(peers);
        Ok(cluster)
    }

    /// A peer at `base`, with its own client (its TLS name may be pinned to its address).
    fn new_peer(&self, base: &str) -> Result<Arc<Peer>, SetupError> {
        let mut b = reqwest::Client::builder()
            .connect_timeout(self.config.connect_timeout)
            .read_timeout(self.config.read_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .tcp_nodelay(true);
        for c in &self.roots {
            b = b.add_root_certificate(c.clone());
        }
        if let Some(id) = &self.identity {
            b = b.identity(id.clone());
        }
        let mut target = base.to_owned();
        if let (Some(name), Ok(url)) = (&self.config.server_name, url::Url::parse(base))
            && url.scheme() == "https"
            && let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default())
            && let Ok(ip) = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
        {
            b = b.resolve(name, std::net::SocketAddr::new(ip, port));
            target = format!("https://{name}:{port}");
        }
        let client = b.build().map_err(|e| SetupError::new("cluster.peers", e))?;
        Ok(Arc::new(Peer {
            base: base.to_owned(),
            target,
            client,
            up: AtomicBool::new(false),
            is_self: AtomicBool::new(false),
        }))
    }

    /// This replica's instance id (answered on [`ID_PATH`]).
    pub fn id(&self) -> &str {
        &self.id
    }

    fn snapshot(&self) -> Vec<Arc<Peer>> {
        self.peers.read().clone()
    }

    /// The replicas in the order they should be asked for `digest`: the owner first. Only
    /// replicas that answered their last probe, and this one (when it found itself).
    pub fn owners(&self, digest: &Digest) -> Vec<Arc<Peer>> {
        let mut live: Vec<(Arc<Peer>, [u8; 32])> = self
            .snapshot()
            .into_iter()
            .filter(|p| p.is_self() || p.up.load(Ordering::Relaxed))
            .map(|p| {
                let s = score(&p.base, digest);
                (p, s)
            })
            .collect();
        live.sort_by_key(|(_, s)| std::cmp::Reverse(*s));
        live.into_iter().map(|(p, _)| p).collect()
    }

    fn mark(&self, peer: &Peer, up: bool) {
        if peer.up.swap(up, Ordering::Relaxed) != up && !peer.is_self() {
            if up {
                tracing::info!(peer = %peer.base, "peer is up");
            } else {
                tracing::warn!(peer = %peer.base, "peer is down: its blobs go to the next replica");
            }
        }
        let n = self
            .snapshot()
            .iter()
            .filter(|p| p.is_self() || p.up.load(Ordering::Relaxed))
            .count();
        self.metrics.peers_up.set(n as i64);
    }

    /// Asks `peer` for a blob of `t`, from byte `from` on. The response may be 200 (whole blob,
    /// when the peer could not honour the range) or 206.
    pub async fn fetch(
        &self,
        peer: &Peer,
        t: &Target,
        digest: &Digest,
        from: u64,
        authorization: Option<&str>,
    ) -> Result<reqwest::Response, PeerError> {
        let url = format!(
            "{}/v2/{}/blobs/{digest}?ns={}",
            peer.target, t.repo, t.registry
        );
        let mut req = peer.client.get(&url).header(PEER_HEADER, &self.id);
        if from > 0 {
            req = req.header(header::RANGE, format!("bytes={from}-"));
        }
        if let Some(a) = authorization.and_then(|a| HeaderValue::from_str(a).ok()) {
            req = req.header(header::AUTHORIZATION, a);
        }
        match req.send().await {
            Ok(resp) if resp.status().is_success() => {
                self.mark(peer, true);
                Ok(resp)
            }
            Ok(resp) => {
                self.mark(peer, true);
                self.metrics.record_peer(PeerResult::Error);
                Err(PeerError::Status(resp.status()))
            }
            Err(e) => {
                self.mark(peer, false);
                self.metrics.record_peer(PeerResult::Unreachable);
                Err(PeerError::Unreachable(crate::upstream::error_chain(&e)))
            }
        }
    }

    /// Marks a peer down after its stream broke.
    pub fn failed(&self, peer: &Peer) {
        self.mark(peer, false);
    }

    /// Probes peers now and every `probe_interval` (resolving `dns` again each time).
    pub fn spawn_probes(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(me) = weak.upgrade() else { return };
                me.probe_all().await;
                let pause = me.config.probe_interval;
                drop(me);
                tokio::time::sleep(pause).await;
            }
        });
    }

    async fn discover(&self) {
        let Some(dns) = &self.config.dns else { return };
        let (Some(host), Some(port)) = (dns.host_str(), dns.port_or_known_default()) else {
            return;
        };
        let found = match tokio::net::lookup_host((host, port)).await {
            Ok(addrs) => addrs,
            Err(e) => {
                tracing::warn!(name = host, error = %e, "cannot resolve the cluster's peers");
                return;
            }
        };
        let mut bases: Vec<String> = found.map(|a| format!("{}://{a}", dns.scheme())).collect();
        bases.sort();
        bases.dedup();
        let mut peers = self.peers.write();
        let kept: Vec<Arc<Peer>> = bases
            .iter()
            .filter_map(|b| match peers.iter().find(|p| &p.base == b) {
                Some(p) => Some(p.clone()),
                None => self
                    .new_peer(b)
                    .inspect_err(|e| tracing::warn!(error = %e, "cannot add peer"))
                    .ok(),
            })
            .collect();
        *peers = kept;
    }

    /// Whether the peers were probed at least once (until then this replica is not ready:
    /// it would not know the blobs' owners).
    pub fn is_ready(&self) -> bool {
        self.probed.load(Ordering::Relaxed)
    }

    /// Whether a connection comes from one of the peers.
    pub fn is_peer(&self, ip: IpAddr) -> bool {
        self.peer_ips.read().contains(&ip)
    }

    async fn probe_all(&self) {
        self.discover().await;
        let peers = self.snapshot();
        let mut ips = HashSet::new();
        for p in &peers {
            let Ok(u) = url::Url::parse(&p.base) else {
                continue;
            };
            let (Some(host), Some(port)) = (u.host_str(), u.port_or_known_default()) else {
                continue;
            };
            let host = host.trim_start_matches('[').trim_end_matches(']');
            match host.parse::<IpAddr>() {
                Ok(ip) => {
                    ips.insert(ip);
                }
                Err(_) => {
                    if let Ok(found) = tokio::net::lookup_host((host, port)).await {
                        ips.extend(found.map(|a| a.ip()));
                    }
                }
            }
        }
        *self.peer_ips.write() = ips;
        let probes = peers.iter().map(|p| self.probe(p));
        futures_util::future::join_all(probes).await;
        if !self.probed.swap(true, Ordering::Relaxed) {
            let up = self.metrics.peers_up.get();
            tracing::info!(peers = peers.len(), up, "first round of peer probes done");
        }
    }

    async fn probe(&self, peer: &Peer) {
        let answer = peer
            .client
            .get(format!("{}{ID_PATH}", peer.target))
            .timeout(self.config.connect_timeout * 2)
            .send()
            .await;
        let id = match answer {
            Ok(resp) if resp.status().is_success() => resp.text().await.ok(),
            _ => None,
        };
        match id {
            Some(id) => {
                let is_self = id.trim() == self.id;
                if is_self && !peer.is_self.swap(true, Ordering::Relaxed) {
                    tracing::info!(peer = %peer.base, "found this replica among the peers");
                }
                self.mark(peer, true);
            }
            None => self.mark(peer, false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cluster(peers: &[&str]) -> Cluster {
        let config = ClusterConfig {
            peers: peers.iter().map(|p| p.parse().unwrap()).collect(),
            dns: None,
            probe_interval: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(1),
            ca_file: None,
            server_name: None,
            client_cert: None,
            client_key: None,
        };
        let c = Cluster::new(&config, Arc::new(Metrics::new())).unwrap();
        for p in c.snapshot() {
            p.up.store(true, Ordering::Relaxed);
        }
        c
    }

    fn digest(i: u32) -> Digest {
        let mut h = crate::oci::Hasher::new(crate::oci::DigestAlgorithm::Sha256);
        h.update(&i.to_be_bytes());
        h.finish()
    }

    #[test]
    fn owners_agree_spread_and_move_minimally() {
        let peers = ["http://a:5000", "http://b:5000", "http://c:5000"];
        let one = cluster(&peers);
        let two = cluster(&[peers[2], peers[0], peers[1]]);
        let mut per_peer = std::collections::HashMap::new();
        for i in 0..3000 {
            let d = digest(i);
            let a: Vec<String> = one.owners(&d).iter().map(|p| p.base.clone()).collect();
            let b: Vec<String> = two.owners(&d).iter().map(|p| p.base.clone()).collect();
            assert_eq!(a, b, "every replica computes the same order");
            *per_peer.entry(a[0].clone()).or_insert(0) += 1;
        }
        for (p, n) in &per_peer {
            assert!((800..1200).contains(n), "{p} owns {n} of 3000");
        }
        // Peer b dies: only its blobs move, each to the next in its order.
        let b = one.snapshot()[1].clone();
        for i in 0..3000 {
            let d = digest(i);
            let before: Vec<String> = one.owners(&d).iter().map(|p| p.base.clone()).collect();
            b.up.store(false, Ordering::Relaxed);
            let after: Vec<String> = one.owners(&d).iter().map(|p| p.base.clone()).collect();
            b.up.store(true, Ordering::Relaxed);
            let expected: Vec<String> = before.into_iter().filter(|p| p != &b.base).collect();
            assert_eq!(after, expected);
        }
    }
}
