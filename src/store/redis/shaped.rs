//! Acquire scripts generated per shape of call: the same decisions and writes as
//! `acquire.lua`, with each limit's algorithm, window and role written into the script as
//! constants (`acquire_shaped.lua` holds the sections they are made of and says why).
//!
//! A shape is what stays the same from call to call of one set of limits: per rate
//! limit, in order, its algorithm, window (or a bucket's interval), whether it takes,
//! and its place in its identifier's group of limits that share one value. The quotas
//! and a bucket's refill (which a tenant's override may change) and the costs travel as
//! arguments. Calls with a concurrency limit, more than [`MAX_SHAPED_LIMITS`] limits, or
//! a shape beyond the first [`MAX_SHAPES`] of the process use `acquire.lua`, except calls
//! of grouped limits, which only a generated script reads: they get theirs up to twice
//! that many shapes, and fail beyond (a layer has a few shapes: one per way its calls
//! take, with usage reads and reservations).

use std::collections::HashMap;
use std::sync::{LazyLock, RwLock};

use redis::Script;
use smallvec::SmallVec;

use super::super::{LimitCheck, Rule, StateKey};

/// The most limits of a generated script: each takes nine Lua locals, and a Lua function
/// has at most 200.
pub(super) const MAX_SHAPED_LIMITS: usize = 8;

/// The most shapes generated in one process for calls without grouped limits (each is
/// loaded into Redis once, a few KiB there and here). An application has a shape or a
/// few per set of limits it configures; further shapes use `acquire.lua`.
pub(super) const MAX_SHAPES: usize = 64;

/// Per rate limit, in order: algorithm code, window µs (a bucket: 0, its refill is an
/// argument), interval µs (bucket; else 0), 1 if it takes, and its place in its identifier's group plus 1 (0: a state of
/// its own).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Shape(SmallVec<[[u64; 5]; 4]>);

impl Shape {
    /// The shape of a call of these checks, if a generated script can carry it: rate
    /// limits only, at most [`MAX_SHAPED_LIMITS`], and if some are grouped, every member
    /// of that one group once.
    fn of(checks: &[LimitCheck]) -> Option<Self> {
        if checks.len() > MAX_SHAPED_LIMITS {
            return None;
        }
        let mut limits = SmallVec::new();
        let mut group: Option<(&str, u8)> = None;
        let mut seen = 0u32;
        for c in checks {
            let Rule::Rate(algorithm) = &c.rule else {
                return None;
            };
            let [code, _, p2, p3] = algorithm.script_params();
            // A bucket's refill travels with its quota (a tier's quota scales it): tiers
            // add no shapes.
            let p2 = if code == 3 { 0 } else { p2 };
            let member = match c.key.group() {
                Some((key, place)) => {
                    match group {
                        None => group = Some((key, place.members)),
                        Some(g) if g == (key, place.members) => {}
                        Some(_) => return None,
                    }
                    let bit = 1u32 << place.member;
                    if seen & bit != 0 {
                        return None;
                    }
                    seen |= bit;
                    u64::from(place.member) + 1
                }
                None => 0,
            };
            limits.push([code, p2, p3, u64::from(c.take), member]);
        }
        if let Some((_, members)) = group
            && seen.count_ones() != u32::from(members)
        {
            return None;
        }
        Some(Self(limits))
    }

    /// Keys per call: one per limit of its own, one for the group's value.
    fn keys(&self) -> usize {
        let own = self.0.iter().filter(|l| l[4] == 0).count();
        own + usize::from(own < self.0.len())
    }
}

type Scripts = HashMap<Shape, &'static Script, foldhash::fast::RandomState>;

/// Every script generated so far, by shape. Each lives as long as the process, as the
/// static scripts do (there are at most [`MAX_SHAPES`], and at most as many more for
/// shapes with grouped limits).
static SCRIPTS: LazyLock<RwLock<Scripts>> = LazyLock::new(RwLock::default);

/// What carries an acquire of a call's checks.
#[derive(Clone, Copy, Debug)]
pub(super) enum Carrier {
    /// The script generated for their shape.
    Shaped(&'static Script),
    /// `acquire.lua`.
    Any,
}

/// The script for calls of these checks. Calls with grouped limits always get theirs
/// (`acquire.lua` does not read a group's value): `None` if they have none, which a
/// layer never plans (it groups limits only when a generated script can carry its
/// calls).
pub(super) fn script_for(checks: &[LimitCheck]) -> Option<Carrier> {
    let grouped = checks.iter().any(|c| c.key.group().is_some());
    let Some(shape) = Shape::of(checks) else {
        return (!grouped).then_some(Carrier::Any);
    };
    if let Some(script) = SCRIPTS.read().ok().and_then(|s| s.get(&shape).copied()) {
        return Some(Carrier::Shaped(script));
    }
    let Ok(mut scripts) = SCRIPTS.write() else {
        return (!grouped).then_some(Carrier::Any);
    };
    if let Some(script) = scripts.get(&shape) {
        return Some(Carrier::Shaped(script));
    }
    if scripts.len() >= MAX_SHAPES * if grouped { 2 } else { 1 } {
        return (!grouped).then_some(Carrier::Any);
    }
    let script: &'static Script = Box::leak(Box::new(super::script(&source(&shape))));
    scripts.insert(shape, script);
    Some(Carrier::Shaped(script))
}

/// Append one call's arguments for its generated script: per limit, its quota and cost,
/// and for a token bucket its refill per interval.
pub(super) fn push_call(records: &mut Vec<u8>, checks: &[LimitCheck]) {
    for c in checks {
        records.extend_from_slice(&(c.rule.limit() as f64).to_le_bytes());
        records.extend_from_slice(&super::cost_sent(c).to_le_bytes());
        if let Rule::Rate(algorithm) = &c.rule
            && let [3, _, refill, _] = algorithm.script_params()
        {
            records.extend_from_slice(&(refill as f64).to_le_bytes());
        }
    }
}

/// Append one call's KEYS for its generated script: its limits' own keys in order, then
/// its group's value's key (see [`Shape::keys`]).
pub(super) fn push_keys(keys: &mut Vec<StateKey>, checks: &[LimitCheck]) {
    let mut group = None;
    for c in checks {
        match c.key.group() {
            Some((key, _)) => group = group.or(Some(key)),
            None => keys.push(c.key.clone()),
        }
    }
    if let Some(key) = group {
        keys.push(StateKey::from(key));
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
    // The grouped limits (1-based places in the shape), by their place in the group.
    let mut members: Vec<(usize, [u64; 5])> = (1..=n)
        .map(|i| (i, shape.0[i - 1]))
        .filter(|(_, l)| l[4] > 0)
        .collect();
    members.sort_by_key(|(_, l)| l[4]);
    let member_list = |item: &dyn Fn(usize) -> String, join: &str| {
        members
            .iter()
            .map(|(i, _)| item(*i))
            .collect::<Vec<_>>()
            .join(join)
    };
    // Each limit's key's place among the call's keys (0 for a grouped one).
    let key_index: Vec<usize> = shape
        .0
        .iter()
        .scan(0, |own, l| {
            if l[4] == 0 {
                *own += 1;
                Some(*own)
            } else {
                Some(0)
            }
        })
        .collect();
    let group_at = shape.keys();
    let bucket = |i: usize| shape.0[i - 1][0] == 3;
    let quotas = list(&|i| match bucket(i) {
        true => format!("q{i}, c{i}, f{i}"),
        false => format!("q{i}, c{i}"),
    });
    let format = format!(
        "<{}",
        (1..=n)
            .map(|i| if bucket(i) { "ddd" } else { "dd" })
            .collect::<String>()
    );
    // The reply's values per call: each limit's of its own, then the group's.
    let mut raws: Vec<String> = (1..=n)
        .filter(|&i| shape.0[i - 1][4] == 0)
        .map(|i| format!("r{i}"))
        .collect();
    if !members.is_empty() {
        raws.push("graw".to_owned());
    }
    let replied = raws.len();
    let raws = raws.join(", ");
    let slots = (1..=replied)
        .map(|i| format!("reply[len + {}]", i + 1))
        .collect::<Vec<_>>()
        .join(", ");
    let failed = vec!["false"; replied].join(", ");
    // The value holds its members' numbers by columns: every first one, every second,
    // every third.
    let column = |name: char| member_list(&|i| format!("g{i}{name}"), ", ");
    let gvars = [column('A'), column('B'), column('C')].join(", ");
    let gsum = [column('A'), column('B'), column('C')]
        .join(", ")
        .replace(", ", " + ");
    let gzeros = vec!["0"; 3 * members.len()].join(", ");
    let gformat = format!("<B{}", "ddd".repeat(members.len()));
    let gclamps = member_list(
        &|i| format!("          g{i}A, g{i}B, g{i}C = clamped(g{i}A, g{i}B, g{i}C)"),
        "\n",
    );
    let takers: Vec<(usize, [u64; 5])> =
        members.iter().copied().filter(|(_, l)| l[3] == 1).collect();
    let gtakes = takers
        .iter()
        .map(|(i, _)| format!("c{i} > 0"))
        .collect::<Vec<_>>()
        .join(" or ");
    // In place only when every member that takes counts in windows (a bucket's take
    // moves its refill time too): the doubles from the first taker's count to the last
    // one's, each taker's new count and the rest as read.
    let gsame = if takers.iter().any(|(_, l)| l[0] == 3) {
        "false".to_owned()
    } else {
        takers
            .iter()
            .map(|(i, _)| format!("s{i}"))
            .collect::<Vec<_>>()
            .join(" and ")
    };
    let (span_at, span) = match (takers.first(), takers.last()) {
        (Some((_, first)), Some((_, last))) => {
            let (from, to) = (first[4] as usize - 1, last[4] as usize - 1);
            // The counts are the second column: member m's at double M + m.
            let span: Vec<String> = members[from..=to]
                .iter()
                .map(|(i, l)| match l[3] {
                    1 => format!("u{i} + c{i}"),
                    _ => format!("g{i}B"),
                })
                .collect();
            (1 + 8 * (members.len() + from), span)
        }
        _ => (0, Vec::new()),
    };
    let span_format = format!("<{}", "d".repeat(span.len()));
    let span = span.join(", ");
    let whole = |text: &str| {
        text.replace("$QUOTAS", &quotas)
            .replace("$FORMAT", &format)
            .replace("$SLOTS", &slots)
            .replace("$FAILED", &failed)
            .replace("$RAWS", &raws)
            .replace("$GVARS", &gvars)
            .replace("$GZEROS", &gzeros)
            .replace("$GFORMAT", &gformat)
            .replace("$GLEN", &(1 + 24 * members.len()).to_string())
            .replace("$GSUM", &gsum)
            .replace("$GCLAMPS", &gclamps)
            .replace("$GTAKES", &gtakes)
            .replace("$GSAME", &gsame)
            .replace("$SPANAT", &span_at.to_string())
            .replace("$SPANFORMAT", &span_format)
            .replace("$SPAN", &span)
            .replace("$G", &group_at.to_string())
            .replace("$N", &n.to_string())
            .replace("$R", &replied.to_string())
            .replace("$K", &shape.keys().to_string())
    };
    let limit = |text: &str, i: usize| {
        let [code, p2, p3, take, _] = shape.0[i - 1];
        let used = if take == 1 {
            format!("u{i} + c{i}")
        } else {
            format!("u{i}")
        };
        // A bucket's refill is an argument (see `Shape::of`).
        let p2 = match code {
            3 => format!("f{i}"),
            _ => p2.to_string(),
        };
        text.replace("$ALG", &code.to_string())
            .replace("$P2", &p2)
            .replace("$P3", &p3.to_string())
            .replace("$USED", &used)
            .replace("$j", &key_index[i - 1].to_string())
            .replace("$i", &i.to_string())
    };
    let mut out = whole(section("head"));
    for i in (1..=n).filter(|&i| shape.0[i - 1][4] == 0) {
        out.push_str(&limit(section("read"), i));
    }
    if !members.is_empty() {
        out.push_str(&whole(section("group_read")));
        for (i, l) in &members {
            let read = match l[0] {
                1 => "member_read_1",
                2 => "member_read_2",
                _ => "member_read_3",
            };
            out.push_str(&limit(section(read), *i));
        }
    }
    out.push_str(&whole(section("reply")));
    for i in (1..=n).filter(|&i| shape.0[i - 1][4] == 0 && shape.0[i - 1][3] == 1) {
        out.push_str(&limit(section("write"), i));
    }
    if !takers.is_empty() {
        let places: String = members
            .iter()
            .map(|(i, _)| limit(section("member_place"), *i))
            .collect();
        out.push_str(&whole(section("group_write")).replace("$PLACES\n", &places));
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
            lua.contains("view(KEYS[k + 2], 3, f2, 1000000, now)"),
            "{lua}"
        );
        // The bucket's refill travels with its quota and cost.
        assert!(lua.contains("local q1, c1, q2, c2, f2"), "{lua}");
        assert!(
            lua.contains("struct.unpack('<ddddd', records, at)"),
            "{lua}"
        );
        // Only the limit that takes is written.
        assert!(lua.contains("persist(KEYS[k + 1]") && !lua.contains("persist(KEYS[k + 2]"));
    }

    fn member(rule: Rule, take: bool, group: &str, member: u8, members: u8) -> LimitCheck {
        LimitCheck {
            key: {
                let text: std::sync::Arc<str> = ["k:{t}", group].concat().into();
                crate::store::SharedKeys::grouped_key(&text, 0..5, 5..text.len(), member, members)
            },
            ..check(rule, take)
        }
    }

    #[test]
    fn a_group_is_read_once_and_written_once() {
        let minute = FixedWindow::new(10, Duration::from_secs(60)).unwrap();
        let bucket = TokenBucket::new(100, 5, Duration::from_secs(1)).unwrap();
        // Limit 1 of its own; limits 2 to 4 the group's members 0, 1, 2 (2 and 4 take).
        let checks = [
            check(minute.into(), true),
            member(minute.into(), true, "g:{t}", 0, 3),
            member(bucket.into(), false, "g:{t}", 1, 3),
            member(minute.into(), true, "g:{t}", 2, 3),
        ];
        let shape = Shape::of(&checks).unwrap();
        assert_eq!(shape.keys(), 2);
        let lua = source(&shape);
        assert!(!lua.contains('$'), "unfilled placeholder in:\n{lua}");
        assert_eq!(lua.matches("redis.pcall('GET'").count(), 1, "{lua}");
        assert!(
            lua.contains("view(KEYS[k + 1], 1, 60000000, 0, now)"),
            "{lua}"
        );
        assert!(lua.contains("redis.pcall('GET', KEYS[k + 2])"), "{lua}");
        assert!(lua.contains("#graw == 73"), "{lua}");
        // By columns: the members' first numbers, second numbers, third numbers.
        assert!(
            lua.contains("struct.unpack('<Bddddddddd', graw)")
                && lua.contains("marker, g2A, g3A, g4A, g2B, g3B, g4B, g2C, g3C, g4C ="),
            "{lua}"
        );
        // Each member's view inline, its window a constant.
        assert!(
            lua.contains("local intervals = (elapsed - elapsed % 1000000) / 1000000")
                && lua.contains("local left = g3A - intervals * f3"),
            "{lua}"
        );
        assert!(
            lua.contains("if x * 60000000 > now + 60000000 then x = -1 end"),
            "{lua}"
        );
        // The reply: the limit of its own's value, then the group's.
        assert!(
            lua.contains("reply[len + 1], reply[len + 2], reply[len + 3] = all, r1, graw"),
            "{lua}"
        );
        assert!(lua.contains("len = len + 1 + 2"), "{lua}");
        // In place: the counts column from member 0's (byte 1 + 8 * 3) to member 2's, the
        // bucket's between them as read.
        assert!(
            lua.contains(
                "'SETRANGE', KEYS[k + 2], '25', struct.pack('<ddd', u2 + c2, g3B, u4 + c4)"
            ),
            "{lua}"
        );
        assert!(lua.contains("if s2 and s4 then"), "{lua}");
        assert!(lua.contains("k = k + 2"), "{lua}");
        // A bucket that takes moves its refill time: never in place.
        let checks = [
            member(minute.into(), false, "g:{t}", 0, 2),
            member(bucket.into(), true, "g:{t}", 1, 2),
        ];
        let lua = source(&Shape::of(&checks).unwrap());
        assert!(lua.contains("if false then"), "{lua}");
        assert!(
            lua.contains("struct.pack('<Bdddddd', 2, g1A, g2A, g1B, g2B, g1C, g2C)"),
            "{lua}"
        );
        // No member takes: nothing is written.
        let checks = [
            member(minute.into(), false, "g:{t}", 0, 2),
            member(bucket.into(), false, "g:{t}", 1, 2),
        ];
        let lua = source(&Shape::of(&checks).unwrap());
        assert!(!lua.contains("'SET'") && !lua.contains("SETRANGE"), "{lua}");
    }

    #[test]
    fn a_shape_has_every_member_of_one_group_once() {
        let minute = FixedWindow::new(10, Duration::from_secs(60)).unwrap();
        let rule = Rule::from(minute);
        assert!(
            Shape::of(&[
                member(rule, true, "g:{t}", 0, 2),
                member(rule, true, "g:{t}", 1, 2)
            ])
            .is_some()
        );
        // A member missing, twice, or of two groups: no script reads that right.
        assert!(Shape::of(&[member(rule, true, "g:{t}", 0, 2)]).is_none());
        assert!(
            Shape::of(&[
                member(rule, true, "g:{t}", 0, 2),
                member(rule, true, "g:{t}", 0, 2)
            ])
            .is_none()
        );
        assert!(
            Shape::of(&[
                member(rule, true, "g:{t}", 0, 2),
                member(rule, true, "h:{t}", 1, 2)
            ])
            .is_none()
        );
        // And no carrier at all: acquire.lua does not read groups.
        assert!(script_for(&[member(rule, true, "g:{t}", 0, 2)]).is_none());
        assert!(matches!(
            script_for(&[check(rule, true)]),
            Some(Carrier::Shaped(_))
        ));
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
        // The quota is an argument, not part of the shape, and so is a bucket's refill
        // (a tier's quota scales it).
        let tier = TokenBucket::new(500, 25, Duration::from_secs(1)).unwrap();
        let free = TokenBucket::new(100, 5, Duration::from_secs(1)).unwrap();
        assert_eq!(
            Shape::of(&[check(tier.into(), true)]),
            Shape::of(&[check(free.into(), true)])
        );
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
