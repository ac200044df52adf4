//! Prints the Lua script the Redis store runs for an acquire of one of the shapes that
//! `benchmarks/script_instructions.sh` measures (it needs the `test-util` feature):
//!
//! ```sh
//! cargo run --features test-util --example acquire_script -- four > four.lua
//! ```
//!
//! Shapes: `one` (one fixed window of an hour that takes), `four` (the layer's four-limit
//! shape: a request limit that takes, then a token limit that only checks, twice),
//! `four-grouped` (the same four, as a layer plans them: members of one group, whose
//! states share one value), `any` (a call with a concurrency limit: the script for any
//! limits).

use std::time::Duration;

use tower_llm_ratelimit::store::{LimitCheck, Rule, StateKey};
use tower_llm_ratelimit::{ConcurrencyLimit, FixedWindow, RedisStore};

fn main() {
    let shape = std::env::args().nth(1).unwrap_or_default();
    let hour = FixedWindow::new(1 << 40, Duration::from_secs(3600)).expect("a valid limit");
    let check = |rule: Rule, take: bool| LimitCheck {
        key: "k:{t}".into(),
        rule,
        cost: 1,
        take,
        slot: 0,
    };
    let checks = match shape.as_str() {
        "one" => vec![check(hour.into(), true)],
        "four" => (0..4).map(|i| check(hour.into(), i % 2 == 0)).collect(),
        "four-grouped" => (0..4)
            .map(|i| LimitCheck {
                key: StateKey::grouped("k:{t}", "g:{t}", i, 4),
                ..check(hour.into(), i % 2 == 0)
            })
            .collect(),
        "any" => vec![
            check(hour.into(), true),
            check(
                ConcurrencyLimit::new(2, Duration::from_secs(60))
                    .expect("a valid limit")
                    .into(),
                true,
            ),
        ],
        other => {
            eprintln!("unknown shape {other:?}: one, four, four-grouped or any");
            std::process::exit(2);
        }
    };
    print!("{}", RedisStore::acquire_script_source(&checks));
}
