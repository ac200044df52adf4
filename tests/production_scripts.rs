//! The Lua scripts as a build without the `test-util` feature assembles them (clock.lua,
//! state.lua, the script; see `script` in src/store/redis.rs). The integration tests
//! link the crate with `test-util`, so this is where the production text runs: it must
//! carry no test clock, read no "now" from its caller, pad no TTL, and still decide.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

const CLOCK: &str = include_str!("../src/store/lua/clock.lua");
const STATE: &str = include_str!("../src/store/lua/state.lua");
const ACQUIRE: &str = include_str!("../src/store/lua/acquire.lua");
const ADJUST: &str = include_str!("../src/store/lua/adjust.lua");

fn production(body: &str) -> String {
    [CLOCK, STATE, body].concat()
}

/// One fixed-window limit's record as the scripts take it (six little-endian doubles).
fn fixed_window(limit: f64, window_us: f64, cost: f64, last: f64) -> Vec<u8> {
    [1.0, limit, window_us, 0.0, cost, last]
        .iter()
        .flat_map(|v: &f64| v.to_le_bytes())
        .collect()
}

fn doubles(reply: &[u8]) -> Vec<f64> {
    reply
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn production_scripts_carry_no_test_clock() {
    for body in [ACQUIRE, ADJUST] {
        let source = production(body);
        for hook in ["override", "ttl_pad", "600000", "server_clock"] {
            assert!(!source.contains(hook), "{hook:?} in a production script");
        }
    }
}

#[test]
fn production_scripts_decide_on_the_server_clock_with_unpadded_ttls() {
    let server = common::RedisServer::start();
    let client = redis::Client::open(server.url.as_str()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let key = format!("{}:rpm:{{user-1}}", common::unique_prefix("prod"));
    let window_us = 60e6;

    // One call, one limit of 5 per minute, taking 1; a caller's "now" of 1 µs (what a
    // test build would read) must be ignored.
    let mut records = 1f64.to_le_bytes().to_vec();
    records.extend(fixed_window(5.0, window_us, 1.0, 1.0));
    let reply: Vec<u8> = redis::Script::new(&production(ACQUIRE))
        .key(&key)
        .arg(1)
        .arg(records)
        .arg(1)
        .invoke(&mut conn)
        .unwrap();
    let reply = doubles(&reply);
    // allowed_all, then allowed, limit, remaining, reset_after_us, retry_after_us, window.
    assert_eq!(&reply[..5], &[1.0, 1.0, 5.0, 4.0, reply[4]]);
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as f64;
    let window = (now_us / window_us).floor();
    assert!(
        (reply[6] - window).abs() <= 1.0,
        "window {} decided, the server's is {window}",
        reply[6]
    );
    let ttl_ms: i64 = redis::cmd("PTTL").arg(&key).query(&mut conn).unwrap();
    assert!(
        (1..=60_000).contains(&ttl_ms),
        "TTL {ttl_ms} ms: padded or missing"
    );

    // A settlement (a charge of 2, no id) lands on the same state, unpadded too.
    let mut records = [1f64, 0.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect::<Vec<u8>>();
    records.extend(fixed_window(5.0, window_us, 2.0, -1.0));
    let reply: Vec<u8> = redis::Script::new(&production(ADJUST))
        .key(&key)
        .arg(1)
        .arg(10_000)
        .arg(1)
        .arg(records)
        .invoke(&mut conn)
        .unwrap();
    let reply = doubles(&reply);
    assert_eq!(&reply[..4], &[1.0, 1.0, 5.0, 2.0], "{reply:?}");

    // A settlement with an id (a refund of 1), sent twice: applied once, and the id's
    // key expires after the time given (10 s), unpadded.
    let mut records = [1f64, 1.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect::<Vec<u8>>();
    records.extend(fixed_window(5.0, window_us, -1.0, -1.0));
    let id_key = format!("{key}:settlement:7");
    for attempt in ["first", "retry"] {
        let reply: Vec<u8> = redis::Script::new(&production(ADJUST))
            .key(&key)
            .key(&id_key)
            .arg(1)
            .arg(10_000)
            .arg(1)
            .arg(&records)
            .invoke(&mut conn)
            .unwrap();
        assert_eq!(doubles(&reply)[3], 3.0, "{attempt}");
    }
    let ttl_ms: i64 = redis::cmd("PTTL").arg(&id_key).query(&mut conn).unwrap();
    assert!((1..=10_000).contains(&ttl_ms), "id TTL {ttl_ms} ms");
    let ttl_ms: i64 = redis::cmd("PTTL").arg(&key).query(&mut conn).unwrap();
    assert!(
        (1..=60_000).contains(&ttl_ms),
        "TTL {ttl_ms} ms: padded or missing"
    );
}
