//! The Lua scripts as a build without the `test-util` feature assembles them (clock.lua,
//! state.lua, the script; see `script` in src/store/redis/mod.rs). The integration tests
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

/// A script's reply: the time it decided at (µs), then its values.
fn reply_of(value: redis::Value) -> (f64, Vec<redis::Value>) {
    let redis::Value::Array(mut parts) = value else {
        panic!("not an array: {value:?}");
    };
    let redis::Value::Int(now) = parts.remove(0) else {
        panic!("no time first: {parts:?}");
    };
    (now as f64, parts)
}

/// The numbers of a fixed window's state as stored: window index, used.
fn stored(conn: &mut redis::Connection, key: &str) -> (f64, f64) {
    let raw: Vec<u8> = redis::cmd("GET").arg(key).query(conn).unwrap();
    assert_eq!((raw.len(), raw[0]), (25, 1), "{raw:?}");
    let at = |i: usize| f64::from_le_bytes(raw[i..i + 8].try_into().unwrap());
    (at(1), at(9))
}

/// That a script decided at `now` (µs) by the server's clock (within a minute of this
/// machine's, which runs it); this machine's time.
fn assert_server_clock(now: f64) -> f64 {
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as f64;
    assert!(
        (now - now_us).abs() < 60e6,
        "decided at {now} µs, the server's clock reads {now_us}"
    );
    now_us
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
    records.extend(1f64.to_le_bytes());
    records.extend(fixed_window(5.0, window_us, 1.0, 1.0));
    let reply: redis::Value = redis::Script::new(&production(ACQUIRE))
        .key(&key)
        .arg(records)
        .arg(1)
        .invoke(&mut conn)
        .unwrap();
    // The time, then allowed_all and the state as read (none yet).
    let (now, parts) = reply_of(reply);
    assert_eq!(parts, [redis::Value::Int(1), redis::Value::Nil]);
    let now_us = assert_server_clock(now);
    let (window, used) = stored(&mut conn, &key);
    assert_eq!(used, 1.0);
    assert!(
        (window - (now_us / window_us).floor()).abs() <= 1.0,
        "window {window} decided, the server's is {}",
        (now_us / window_us).floor()
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
    let reply: redis::Value = redis::Script::new(&production(ADJUST))
        .key(&key)
        .arg(1)
        .arg(10_000)
        .arg(1)
        .arg(records)
        .invoke(&mut conn)
        .unwrap();
    // Applied; the state it read had 1 used.
    let (_, parts) = reply_of(reply);
    assert_eq!(parts[0], redis::Value::Int(1), "{parts:?}");
    assert_eq!(stored(&mut conn, &key).1, 3.0);

    // A settlement with an id (a refund of 1), sent twice: applied once, and the id's
    // key expires after the time given (10 s), unpadded.
    let mut records = [1f64, 1.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect::<Vec<u8>>();
    records.extend(fixed_window(5.0, window_us, -1.0, -1.0));
    let id_key = format!("{key}:settlement:7");
    for (attempt, applied) in [("first", 1), ("retry", 0)] {
        let reply: redis::Value = redis::Script::new(&production(ADJUST))
            .key(&key)
            .key(&id_key)
            .arg(1)
            .arg(10_000)
            .arg(1)
            .arg(&records)
            .invoke(&mut conn)
            .unwrap();
        let (_, parts) = reply_of(reply);
        assert_eq!(parts[0], redis::Value::Int(applied), "{attempt}");
        assert_eq!(stored(&mut conn, &key).1, 2.0, "{attempt}");
    }
    let ttl_ms: i64 = redis::cmd("PTTL").arg(&id_key).query(&mut conn).unwrap();
    assert!((1..=10_000).contains(&ttl_ms), "id TTL {ttl_ms} ms");
    let ttl_ms: i64 = redis::cmd("PTTL").arg(&key).query(&mut conn).unwrap();
    assert!(
        (1..=60_000).contains(&ttl_ms),
        "TTL {ttl_ms} ms: padded or missing"
    );
}

/// A script generated for one shape of call, as a build without `test-util` assembles
/// it (the same text, less test_clock.lua, which only `test-util` builds append): no
/// test hook, the server's clock, an unpadded TTL.
#[test]
fn generated_scripts_in_production_decide_on_the_server_clock() {
    use std::time::Duration;
    use tower_llm_ratelimit::store::LimitCheck;
    use tower_llm_ratelimit::{FixedWindow, RedisStore};
    let test_clock = include_str!("../src/store/lua/test_clock.lua");
    let check = LimitCheck {
        key: "k:{t}".into(),
        rule: FixedWindow::new(5, Duration::from_secs(60)).unwrap().into(),
        cost: 1,
        take: true,
        slot: 0,
    };
    let built = RedisStore::acquire_script_source(&[check]);
    assert!(built.contains(test_clock));
    let source = built.replace(test_clock, "");
    // The window is a constant of the script, not an argument: a generated script.
    assert!(
        source.contains("view(KEYS[k + 1], 1, 60000000, 0, now)"),
        "{source}"
    );
    for hook in ["override", "ttl_pad", "server_clock"] {
        assert!(!source.contains(hook), "{hook:?} in a production script");
    }
    let server = common::RedisServer::start();
    let client = redis::Client::open(server.url.as_str()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let key = format!("{}:rpm:{{user-1}}", common::unique_prefix("prod-shaped"));
    // One call: its quota (5) and cost (1); a caller's "now" of 1 µs must be ignored.
    let records: Vec<u8> = [1f64, 5.0, 1.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let script = redis::Script::new(&source);
    for taken in 1..=6 {
        let reply: redis::Value = script
            .key(&key)
            .arg(&records)
            .arg(1)
            .invoke(&mut conn)
            .unwrap();
        let (now, parts) = reply_of(reply);
        assert_server_clock(now);
        assert_eq!(
            parts[0],
            redis::Value::Int(i64::from(taken <= 5)),
            "call {taken}"
        );
    }
    assert_eq!(stored(&mut conn, &key).1, 5.0);
    let ttl_ms: i64 = redis::cmd("PTTL").arg(&key).query(&mut conn).unwrap();
    assert!(
        (1..=60_000).contains(&ttl_ms),
        "TTL {ttl_ms} ms: padded or missing"
    );
}
