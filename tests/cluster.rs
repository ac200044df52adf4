//! Redis Cluster: the layer's multi-key scripts on a real 3-master cluster, through a
//! manual failover (a replica promoted) under load, with no wrong decision.
#![cfg(feature = "cluster")]

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tower::{BoxError, ServiceExt, service_fn};
use tower_llm_ratelimit::{
    ErrorKind, FixedWindow, Limit, LlmRequest, LlmResponse, RatelimitLayer, RedisOptions,
    RedisStore, Usage,
};

const LIMIT: u64 = 50;

async fn llm(_: LlmRequest) -> Result<LlmResponse, BoxError> {
    Ok(LlmResponse {
        text: String::new(),
        usage: Some(Usage::new(2, 1)),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_under_load_makes_no_wrong_decision() {
    let cluster = tokio::task::spawn_blocking(cluster::Cluster::start)
        .await
        .unwrap();
    let urls = cluster.urls();
    let nodes: Vec<&str> = urls.iter().map(String::as_str).collect();
    let store = RedisStore::connect_cluster(&nodes, RedisOptions::default())
        .await
        .unwrap();
    let layer = RatelimitLayer::builder()
        .store(store)
        .prefix(common::unique_prefix("failover"))
        .request_limit(FixedWindow::new(LIMIT, tower_llm_ratelimit::algorithm::MAX_WINDOW).unwrap())
        .token_limit(
            FixedWindow::new(1_000_000, tower_llm_ratelimit::algorithm::MAX_WINDOW).unwrap(),
        )
        .build()
        .unwrap();
    let svc = tower::Layer::layer(&layer, service_fn(llm));
    let ids: Vec<String> = (0..12).map(|i| format!("user-{i}")).collect();
    // identifier -> (allowed, store errors)
    let tally: Arc<Mutex<HashMap<String, (u64, u64)>>> = Arc::default();
    let call = {
        let (svc, tally) = (svc.clone(), tally.clone());
        move |id: String| {
            let (svc, tally) = (svc.clone(), tally.clone());
            async move {
                let result = svc.oneshot(LlmRequest::new(id.clone(), "hi")).await;
                let mut t = tally.lock().unwrap();
                let entry = t.entry(id).or_default();
                match result {
                    Ok(_) => entry.0 += 1,
                    Err(e) if e.kind() == ErrorKind::RequestLimitReached => {}
                    Err(_) => entry.1 += 1,
                }
            }
        }
    };
    // Before: 20 calls per identifier.
    for _ in 0..20 {
        futures_join(ids.iter().map(|id| call(id.clone()))).await;
    }
    // During: load on every identifier while the master of user-0's slot fails over.
    let key = format!("{{{}}}", ids[0]);
    let (master, replica) = tokio::task::block_in_place(|| cluster.master_and_replica_of(&key));
    let load = {
        let ids = ids.clone();
        let call = call.clone();
        tokio::spawn(async move {
            for _ in 0..20 {
                futures_join(ids.iter().map(|id| call(id.clone()))).await;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    // A manual failover aborts if the replica cannot catch up in time (a loaded
    // machine): ask again, up to three times.
    for _attempt in 0..3 {
        let reply = cluster.cli(replica, &["cluster", "failover"]);
        assert!(reply.contains("OK"), "CLUSTER FAILOVER: {reply}");
        for _ in 0..400 {
            if cluster.cli(replica, &["role"]).starts_with("master") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        if cluster.cli(replica, &["role"]).starts_with("master") {
            break;
        }
    }
    assert!(
        cluster.cli(replica, &["role"]).starts_with("master"),
        "the replica was not promoted"
    );
    for _ in 0..200 {
        if cluster.cli(master, &["role"]).starts_with("slave") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        cluster.cli(master, &["role"]).starts_with("slave"),
        "the old master did not step down"
    );
    load.await.unwrap();
    tokio::task::block_in_place(|| cluster.wait_until_ok());
    // After: call each identifier until denied.
    for _ in 0..20 {
        futures_join(ids.iter().map(|id| call(id.clone()))).await;
    }
    let tally = tally.lock().unwrap();
    for id in &ids {
        let (allowed, errors) = tally[id];
        // Never more than the limit; fewer only by calls whose outcome was ambiguous.
        assert!(allowed <= LIMIT, "{id}: {allowed} allowed under {LIMIT}");
        assert!(
            allowed + errors >= LIMIT,
            "{id}: {allowed} allowed, {errors} errors"
        );
    }
}

/// Run the calls concurrently and wait for all of them.
async fn futures_join<F>(futures: impl Iterator<Item = F>)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    for f in futures {
        set.spawn(f);
    }
    while set.join_next().await.is_some() {}
}

/// A reset finds an identifier's per-model states however many keys share its hash
/// slot. A busy identifier's slot also holds a key per recent settlement id; 120 000 of
/// them hid its states from a reset that read only the slot's first 100 000 keys (it
/// answered `Ok` and reset nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_finds_per_model_states_in_a_crowded_slot() {
    let store = cluster::shared_store().await;
    let prefix = common::unique_prefix("crowded");
    let hour = Duration::from_secs(3600);
    let layer = RatelimitLayer::builder()
        .store(store)
        .prefix(prefix.clone())
        .limit(
            "rpm",
            Limit::requests(FixedWindow::new(1, hour).unwrap()).per_model(),
        )
        .build()
        .unwrap();
    let svc = tower::Layer::layer(&layer, service_fn(llm));
    let who = format!("crowd-{}", std::process::id());
    let call = || {
        svc.clone()
            .oneshot(LlmRequest::new(who.clone(), "hi").with_model("m1"))
    };
    call().await.unwrap();
    let denied = call().await.unwrap_err();
    assert_eq!(denied.kind(), ErrorKind::RequestLimitReached);

    // 120 000 other keys in the identifier's slot, written straight to its master.
    let tag_key = format!("x:{{{who}}}");
    let (master, _) = tokio::task::spawn_blocking({
        let tag_key = tag_key.clone();
        move || cluster::shared().master_and_replica_of(&tag_key)
    })
    .await
    .unwrap();
    let client = redis::Client::open(format!("redis://127.0.0.1:{master}/")).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    for batch in 0..12 {
        let mut pipe = redis::pipe();
        for i in 0..10_000 {
            pipe.cmd("SET")
                .arg(format!("{tag_key}:filler:{batch}:{i}"))
                .arg(1)
                .arg("EX")
                .arg(60)
                .ignore();
        }
        let () = pipe.query_async(&mut conn).await.unwrap();
    }

    layer.reset(&who).await.unwrap();
    call()
        .await
        .expect("the per-model state was reset, so the call passes");
}
