//! [`StateKey`]: the name of one limit's state in a store.

use std::borrow::Borrow;
use std::cell::RefCell;
use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::{Deref, Range};
use std::sync::Arc;

/// The key of one limit's state in a [`Store`](super::Store) (see
/// [`state_key`](super::state_key)), as a shared string: cloning it counts a reference.
///
/// The middleware builds all the keys of one call (and the identifier's tag) in one
/// allocation, each key a slice of it. A `StateKey` compares, orders, hashes, prints and
/// dereferences exactly as the `str` it holds, so a custom store uses it as one; build
/// one from a `&str`, `String` or `Arc<str>` with `From`.
///
/// A key keeps its whole buffer alive: a store that keeps keys for long (in a map of
/// states, say) should keep a copy of the string (`key.to_string()`), not the key.
///
/// ```
/// use tower_llm_ratelimit::store::StateKey;
///
/// let key = StateKey::from("rl:rpm:{user-42}");
/// assert_eq!(key, "rl:rpm:{user-42}");
/// assert!(key.ends_with("{user-42}"));
/// ```
#[derive(Clone)]
pub struct StateKey {
    text: Arc<str>,
    start: usize,
    end: usize,
    /// Where a store that keeps a layer's identifier-wide limits together (the Redis
    /// store) finds this limit's state instead; the key itself names it all the same.
    group: Option<GroupPlace>,
}

/// A limit's place in the value its identifier's grouped limits share: that value's key
/// (a range of the same text as the limit's own key), the limit's index among the
/// group's members, and how many members the group has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct GroupPlace {
    start: u32,
    end: u32,
    pub(crate) member: u8,
    pub(crate) members: u8,
}

impl StateKey {
    /// The key as a string slice.
    #[inline]
    pub fn as_str(&self) -> &str {
        // In bounds and on character boundaries: both are set only from the lengths of
        // whole strings pushed into `text` (see `SharedKeys`).
        &self.text[self.start..self.end]
    }

    /// Benchmarks only (feature `test-util`): the key `key` of a limit whose state is
    /// member `member` of `members` in the value at `group`, as a layer plans the limits
    /// that all its calls have (for printing and measuring the script that reads them).
    #[cfg(feature = "test-util")]
    #[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
    pub fn grouped(key: &str, group: &str, member: u8, members: u8) -> StateKey {
        let text: Arc<str> = [key, group].concat().into();
        let members = members.max(1);
        SharedKeys::grouped_key(
            &text,
            0..key.len(),
            key.len()..text.len(),
            member.min(members - 1),
            members,
        )
    }

    /// The key of the value this limit's state shares with its group, and its place
    /// there; `None` for a limit with a key of its own.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn group(&self) -> Option<(&str, GroupPlace)> {
        let g = self.group?;
        Some((&self.text[g.start as usize..g.end as usize], g))
    }
}

impl Deref for StateKey {
    type Target = str;

    #[inline]
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for StateKey {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for StateKey {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl From<Arc<str>> for StateKey {
    fn from(text: Arc<str>) -> Self {
        let end = text.len();
        Self {
            text,
            start: 0,
            end,
            group: None,
        }
    }
}

impl From<&str> for StateKey {
    fn from(text: &str) -> Self {
        Arc::<str>::from(text).into()
    }
}

impl From<String> for StateKey {
    fn from(text: String) -> Self {
        Arc::<str>::from(text).into()
    }
}

impl PartialEq for StateKey {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        // The same slice of the same buffer is the same key without reading it.
        (Arc::ptr_eq(&self.text, &other.text) && self.start == other.start && self.end == other.end)
            || self.as_str() == other.as_str()
    }
}

impl Eq for StateKey {}

impl PartialEq<str> for StateKey {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for StateKey {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialOrd for StateKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for StateKey {
    fn cmp(&self, other: &Self) -> Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl Hash for StateKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // As `str` hashes, so that `Borrow<str>` lookups find it.
        self.as_str().hash(state);
    }
}

impl fmt::Debug for StateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for StateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Several strings written one after another into a reused per-thread buffer, then
/// shared as [`StateKey`]s of one allocation.
pub(crate) struct SharedKeys<'b> {
    buffer: &'b mut String,
}

impl SharedKeys<'_> {
    /// Run `f` with an empty buffer; what it returns is built from the shared text.
    pub(crate) fn build<T>(f: impl FnOnce(&mut SharedKeys<'_>) -> T) -> T {
        thread_local! {
            static BUFFER: RefCell<String> = const { RefCell::new(String::new()) };
        }
        BUFFER.with(|buffer| match buffer.try_borrow_mut() {
            Ok(mut buffer) => {
                buffer.clear();
                f(&mut SharedKeys {
                    buffer: &mut buffer,
                })
            }
            // `f` plans again on this thread (a cost function that calls another
            // layer, say): the nested plan gets a buffer of its own.
            Err(_) => f(&mut SharedKeys {
                buffer: &mut String::new(),
            }),
        })
    }

    /// Append the pieces of one string; its place in the buffer.
    pub(crate) fn push(&mut self, pieces: &[&str]) -> Range<usize> {
        let start = self.buffer.len();
        for piece in pieces {
            self.buffer.push_str(piece);
        }
        start..self.buffer.len()
    }

    /// Append the state key `<head><tag>}` (`head` ends in `:{`); its place.
    #[inline]
    pub(crate) fn push_key(&mut self, head: &str, tag: &str) -> Range<usize> {
        let start = self.buffer.len();
        self.buffer.push_str(head);
        self.buffer.push_str(tag);
        self.buffer.push('}');
        start..self.buffer.len()
    }

    /// Everything pushed, in one allocation.
    pub(crate) fn share(&self) -> Arc<str> {
        Arc::from(self.buffer.as_str())
    }

    /// The string pushed at `range` of `text` (what [`SharedKeys::share`] returned).
    pub(crate) fn key(text: &Arc<str>, range: Range<usize>) -> StateKey {
        debug_assert!(text.get(range.clone()).is_some());
        StateKey {
            text: text.clone(),
            start: range.start,
            end: range.end,
            group: None,
        }
    }

    /// The key at `range` of `text`, whose state is member `member` of `members` in the
    /// value at `group` of the same text (see [`StateKey::group`]).
    pub(crate) fn grouped_key(
        text: &Arc<str>,
        range: Range<usize>,
        group: Range<usize>,
        member: u8,
        members: u8,
    ) -> StateKey {
        debug_assert!(text.get(group.clone()).is_some() && member < members);
        let mut key = Self::key(text, range);
        // Keys are a few hundred bytes at most (a prefix of 128 and a tag of 64).
        key.group = Some(GroupPlace {
            start: group.start as u32,
            end: group.end as u32,
            member,
            members,
        });
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_one_buffer_are_their_own_strings() {
        let (a, b, again) = SharedKeys::build(|keys| {
            let a = keys.push(&["p:", "{é}"]);
            let b = keys.push_key("q:{", "é");
            let text = keys.share();
            (
                SharedKeys::key(&text, a.clone()),
                SharedKeys::key(&text, b),
                SharedKeys::key(&text, a),
            )
        });
        assert_eq!(a, "p:{é}");
        assert_eq!(b.as_str(), "q:{é}");
        assert_eq!(a, again);
        assert_ne!(a, b);
        assert_eq!(a, StateKey::from("p:{é}"));
        assert_eq!(format!("{a} {a:?}"), "p:{é} \"p:{é}\"");
        let mut set = std::collections::HashSet::new();
        set.insert(a.clone());
        assert!(set.contains("p:{é}"));
        let (low, high) = (StateKey::from("a"), StateKey::from(String::from("b")));
        assert!(low < high);
    }
}
