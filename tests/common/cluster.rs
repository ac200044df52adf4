//! A real Redis Cluster on loopback, started by the test binary: 3 masters with one
//! replica each (`redis-server --cluster-enabled yes`, `redis-cli --cluster create`).
#![allow(dead_code)]

use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use crate::common::RedisServer;

pub struct Cluster {
    pub nodes: Vec<RedisServer>,
}

impl Cluster {
    pub fn start() -> Cluster {
        let nodes: Vec<RedisServer> = (0..6)
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "1000",
                ])
            })
            .collect();
        let mut args = vec!["--cluster".to_string(), "create".to_string()];
        args.extend(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)));
        args.extend(["--cluster-replicas", "1", "--cluster-yes"].map(String::from));
        let out = Command::new("redis-cli")
            .args(&args)
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = Cluster { nodes };
        cluster.wait_until_ok();
        cluster
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url.clone()).collect()
    }

    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn wait_until_ok(&self) {
        for _ in 0..300 {
            if self.nodes.iter().all(|n| {
                self.cli(n.port, &["cluster", "info"])
                    .contains("cluster_state:ok")
            }) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the cluster did not reach cluster_state:ok");
    }

    /// A connection to the node on `port`. (Tests read the nodes through a connection, not
    /// through `redis-cli`: a process spawned per read made a check of a few keys take
    /// longer than a token takes to refill, on a loaded machine.)
    fn connection(&self, port: u16) -> redis::Connection {
        redis::Client::open(format!("redis://127.0.0.1:{port}/"))
            .and_then(|client| client.get_connection())
            .expect("connect to a cluster node")
    }

    /// Every key under `prefix` (from every master) with its PTTL.
    pub fn keys(&self, prefix: &str) -> Vec<(String, i64)> {
        let mut out: Vec<(String, i64)> = Vec::new();
        for n in &self.nodes {
            let mut c = self.connection(n.port);
            let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut c).expect("ROLE");
            if !matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master") {
                continue;
            }
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{prefix}*"))
                .query(&mut c)
                .expect("KEYS");
            for key in keys {
                let ttl: i64 = redis::cmd("PTTL").arg(&key).query(&mut c).expect("PTTL");
                out.push((key, ttl));
            }
        }
        out
    }

    /// The value of `key` (its bytes, printed), read on the master that owns its slot.
    pub fn get(&self, key: &str) -> Option<String> {
        for n in &self.nodes {
            let mut c = self.connection(n.port);
            // Another node's slot is refused with MOVED (an error here); a replica's too,
            // since the connection is not in READONLY mode.
            if let Ok(value) = redis::cmd("GET").arg(key).query::<Option<Vec<u8>>>(&mut c) {
                return value.map(|bytes| format!("{bytes:?}"));
            }
        }
        None
    }

    /// The port of the master serving `key`'s slot, and of one of its replicas (waiting
    /// for the topology to spread through the cluster's gossip).
    pub fn master_and_replica_of(&self, key: &str) -> (u16, u16) {
        for _ in 0..200 {
            if let Some(found) = self.try_master_and_replica_of(key) {
                return found;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("no master with a replica found for {key}");
    }

    fn try_master_and_replica_of(&self, key: &str) -> Option<(u16, u16)> {
        let any = self.nodes[0].port;
        let slot: u16 = self
            .cli(any, &["cluster", "keyslot", key])
            .trim()
            .parse()
            .unwrap();
        let nodes = self.cli(any, &["cluster", "nodes"]);
        let mut master = None;
        for line in nodes.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 8 && f[2].contains("master") {
                let owns = f[8..].iter().any(|r| match r.split_once('-') {
                    Some((a, b)) => {
                        a.parse::<u16>().is_ok_and(|a| a <= slot)
                            && b.parse::<u16>().is_ok_and(|b| slot <= b)
                    }
                    None => r.parse::<u16>() == Ok(slot),
                });
                if owns {
                    master = Some((f[0].to_string(), port_of(f[1])));
                }
            }
        }
        let (id, port) = master?;
        let replica = nodes
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() > 3 && f[2].contains("slave") && f[3] == id)
            .map(|f| port_of(f[1]))?;
        Some((port, replica))
    }
}

fn port_of(addr: &str) -> u16 {
    // 127.0.0.1:7000@17000
    addr.split('@')
        .next()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// One cluster for the whole test binary.
pub fn shared() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(Cluster::start)
}

/// A store on the shared cluster (started on first use), with default options.
pub async fn shared_store() -> tower_llm_ratelimit::RedisStore {
    let cluster = tokio::task::spawn_blocking(shared).await.unwrap();
    let urls = cluster.urls();
    let nodes: Vec<&str> = urls.iter().map(String::as_str).collect();
    tower_llm_ratelimit::RedisStore::connect_cluster(
        &nodes,
        tower_llm_ratelimit::RedisOptions::default(),
    )
    .await
    .expect("connect to the test cluster")
}
