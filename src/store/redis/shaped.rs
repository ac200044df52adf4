//! Acquire scripts generated per shape of call: the same decisions and writes as
//! `acquire.lua`, with each limit's algorithm, window and role written into the script as
//! constants (`acquire_shaped.lua` holds the sections they are made of and says why).
//!
//! A shape is what stays the same from call to call of one set of limits: per rate
//! limit, in order, its algorithm, window (or refill and interval), and whether it takes.
//! The quotas (which a tenant's override may change) and the costs travel as arguments.
//! Calls with a concurrency limit, more than [`MAX_SHAPED_LIMITS`] limits, or a shape
//! beyond the first [`MAX_SHAPES`] of the process use `acquire.lua`.

use std::collections::HashMap;
use std::sync::{LazyLock, RwLock};

use redis::Script;
use smallvec::SmallVec;

use super::super::{LimitCheck, Rule};

/// The most limits of a generated script: each takes nine Lua locals, and a Lua function
/// has at most 200.
pub(super) const MAX_SHAPED_LIMITS: usize = 8;

/// The most shapes generated in one process (each is loaded into Redis once, a few KiB
/// there and here). An application has one shape per set of limits it configures (and
/// per tier whose override changes a window); further shapes use `acquire.lua`.
pub(super) const MAX_SHAPES: usize = 64;

/// Per rate limit, in order: algorithm code, window µs (or refill), interval µs (bucket;
/// else 0), 1 if it takes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Shape(SmallVec<[[u64; 4]; 4]>);

impl Shape {
    /// The shape of a call of these checks, if a generated script can carry it.
    fn of(checks: &[LimitCheck]) -> Option<Self> {
        if checks.len() > MAX_SHAPED_LIMITS {
            return None;
        }
        let mut limits = SmallVec::new();
        for c in checks {
            let Rule::Rate(algorithm) = &c.rule else {
                return None;
            };
            let [code, _, p2, p3] = algorithm.script_params();
            limits.push([code, p2, p3, u64::from(c.take)]);
        }
        Some(Self(limits))
    }
}

type Scripts = HashMap<Shape, &'static Script, foldhash::fast::RandomState>;

/// Every script generated so far, by shape. Each lives as long as the process, as the
/// static scripts do (there are at most [`MAX_SHAPES`]).
static SCRIPTS: LazyLock<RwLock<Scripts>> = LazyLock::new(RwLock::default);

/// The generated script for calls of these checks; `None`: use `acquire.lua`.
pub(super) fn script_for(checks: &[LimitCheck]) -> Option<&'static Script> {
    let shape = Shape::of(checks)?;
    if let Some(script) = SCRIPTS.read().ok()?.get(&shape) {
        return Some(script);
    }
    let mut scripts = SCRIPTS.write().ok()?;
    if let Some(script) = scripts.get(&shape) {
        return Some(script);
    }
    if scripts.len() >= MAX_SHAPES {
        return None;
    }
    let script: &'static Script = Box::leak(Box::new(super::script(&source(&shape))));
    scripts.insert(shape, script);
    Some(script)
}

/// Append one call's arguments for its generated script: per limit, its quota and cost.
pub(super) fn push_call(records: &mut Vec<u8>, checks: &[LimitCheck]) {
    for c in checks {
        records.extend_from_slice(&(c.rule.limit() as f64).to_le_bytes());
        records.extend_from_slice(&super::cost_sent(c).to_le_bytes());
    }
}

const TEMPLATE: &str = include_str!("../lua/acquire_shaped.lua");

/// The section of `acquire_shaped.lua` that starts at the line `--@ <name>`.
fn section(name: &str) -> &'static str {
    TEMPLATE
        .split("--@ ")
        .skip(1)
        .find_map(|s| s.strip_prefix(name)?.strip_prefix('\n'))
        .unwrap_or_default()
}

/// The Lua body of the script for `shape` (without the clock and `state.lua`).
fn source(shape: &Shape) -> String {
    let n = shape.0.len();
    let list = |item: &dyn Fn(usize) -> String| (1..=n).map(item).collect::<Vec<_>>().join(", ");
    let quotas = list(&|i| format!("q{i}, c{i}"));
    let format = format!("<{}", "dd".repeat(n));
    let slots = list(&|i| format!("reply[len + {}]", i + 1));
    let failed = list(&|_| "false".to_owned());
    let raws = list(&|i| format!("r{i}"));
    let whole = |text: &str| {
        text.replace("$QUOTAS", &quotas)
            .replace("$FORMAT", &format)
            .replace("$SLOTS", &slots)
            .replace("$FAILED", &failed)
            .replace("$RAWS", &raws)
            .replace("$N", &n.to_string())
    };
    let limit = |text: &str, i: usize, [code, p2, p3, _]: [u64; 4]| {
        text.replace("$ALG", &code.to_string())
            .replace("$P2", &p2.to_string())
            .replace("$P3", &p3.to_string())
            .replace("$i", &i.to_string())
    };
    let mut out = whole(section("head"));
    for (i, l) in shape.0.iter().enumerate() {
        out.push_str(&limit(section("read"), i + 1, *l));
    }
    out.push_str(&whole(section("reply")));
    for (i, l) in shape.0.iter().enumerate() {
        if l[3] == 1 {
            out.push_str(&limit(section("write"), i + 1, *l));
        }
    }
    out.push_str(&whole(section("tail")));
    out
}

/// The Lua body of the generated script for calls of `checks` (`test-util`: for the
/// benchmark that counts what Redis spends on it), or `None` if they use `acquire.lua`.
#[cfg(feature = "test-util")]
pub(super) fn source_for(checks: &[LimitCheck]) -> Option<String> {
    Shape::of(checks).map(|shape| source(&shape))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::algorithm::{ConcurrencyLimit, FixedWindow, TokenBucket};

    fn check(rule: Rule, take: bool) -> LimitCheck {
        LimitCheck {
            key: "k:{t}".into(),
            rule,
            cost: 1,
            take,
            slot: 0,
        }
    }

    #[test]
    fn every_section_exists_and_every_placeholder_is_filled() {
        for name in ["head", "read", "reply", "write", "tail"] {
            assert!(
                !section(name).trim().is_empty(),
                "section {name} is missing"
            );
        }
        let minute = FixedWindow::new(10, Duration::from_secs(60)).unwrap();
        let bucket = TokenBucket::new(100, 5, Duration::from_secs(1)).unwrap();
        let shape = Shape::of(&[check(minute.into(), true), check(bucket.into(), false)]).unwrap();
        let lua = source(&shape);
        assert!(!lua.contains('$'), "unfilled placeholder in:\n{lua}");
        assert!(
            lua.contains("view(KEYS[k + 1], 1, 60000000, 0, now)"),
            "{lua}"
        );
        assert!(
            lua.contains("view(KEYS[k + 2], 3, 5, 1000000, now)"),
            "{lua}"
        );
        assert!(lua.contains("struct.unpack('<dddd', records, at)"), "{lua}");
        // Only the limit that takes is written.
        assert!(lua.contains("persist(KEYS[k + 1]") && !lua.contains("persist(KEYS[k + 2]"));
    }

    #[test]
    fn shapes_are_rate_limits_only_and_at_most_the_most_limits() {
        let minute = FixedWindow::new(10, Duration::from_secs(60)).unwrap();
        let slots = ConcurrencyLimit::new(2, Duration::from_secs(60)).unwrap();
        assert!(Shape::of(&[check(minute.into(), true), check(slots.into(), true)]).is_none());
        let many: Vec<_> = (0..=MAX_SHAPED_LIMITS)
            .map(|_| check(minute.into(), true))
            .collect();
        assert!(Shape::of(&many[..MAX_SHAPED_LIMITS]).is_some());
        assert!(Shape::of(&many).is_none());
        // The quota is an argument, not part of the shape.
        let other_quota = FixedWindow::new(99, Duration::from_secs(60)).unwrap();
        assert_eq!(
            Shape::of(&[check(minute.into(), true)]),
            Shape::of(&[check(other_quota.into(), true)])
        );
        assert_ne!(
            Shape::of(&[check(minute.into(), true)]),
            Shape::of(&[check(minute.into(), false)])
        );
    }
}
