//! Scopes: which parts of a tree a partial reconcile looks at. A watcher knows which paths
//! changed; instead of walking the whole tree it reconciles only those regions. A region is a path
//! and a depth: the entry alone (a chmod), the entry and its children (a directory whose listing
//! changed), or the whole subtree (a directory created or moved in). Both sides are scanned with
//! the same scope, so the planner compares like with like and deletes only within it.
//!
//! A scope is kept normalized: one depth per path (the deepest asked for), nothing beneath a
//! `Tree` region, and every ancestor of a region present as an `Entry`, so that a parent changed
//! in kind (a directory replaced by a symlink on the target) is seen and its metadata kept.

use crate::path::RelPath;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How much of the tree at a path a region covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Depth {
    /// The entry itself.
    Entry,
    /// The entry and, if it is a directory, its immediate children (not their contents).
    Children,
    /// The entry and everything beneath it.
    Tree,
}

/// A normalized set of regions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scope {
    regions: BTreeMap<RelPath, Depth>,
}

impl Scope {
    /// The whole tree.
    pub fn full() -> Scope {
        Scope::of([(RelPath::root(), Depth::Tree)])
    }

    pub fn of(regions: impl IntoIterator<Item = (RelPath, Depth)>) -> Scope {
        let mut s = Scope::default();
        for (p, d) in regions {
            s.add(p, d);
        }
        s
    }

    /// Adds a region, keeping the scope normalized.
    pub fn add(&mut self, path: RelPath, depth: Depth) {
        if self.under_tree(&path) && self.regions.get(&path) != Some(&Depth::Tree) {
            return;
        }
        if depth == Depth::Tree {
            // Everything beneath is covered now.
            let beneath: Vec<RelPath> = self
                .regions
                .range(path.clone()..)
                .take_while(|(p, _)| p.starts_with(&path))
                .filter(|(p, _)| **p != path)
                .map(|(p, _)| p.clone())
                .collect();
            for p in beneath {
                self.regions.remove(&p);
            }
        }
        let d = self.regions.entry(path.clone()).or_insert(depth);
        *d = (*d).max(depth);
        let mut cur = path.parent();
        while let Some(a) = cur {
            if self.regions.contains_key(&a) {
                break;
            }
            self.regions.insert(a.clone(), Depth::Entry);
            cur = a.parent();
        }
    }

    pub fn merge(&mut self, other: Scope) {
        for (p, d) in other.regions {
            self.add(p, d);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// Regions in path order: ancestors before what lies beneath them.
    pub fn regions(&self) -> impl Iterator<Item = (&RelPath, Depth)> {
        self.regions.iter().map(|(p, d)| (p, *d))
    }

    /// The whole tree is covered.
    pub fn is_full(&self) -> bool {
        self.regions.get(&RelPath::root()) == Some(&Depth::Tree)
    }

    /// True when `p` lies in (or is) a `Tree` region.
    pub fn under_tree(&self, p: &RelPath) -> bool {
        let mut cur = Some(p.clone());
        while let Some(c) = cur {
            if self.regions.get(&c) == Some(&Depth::Tree) {
                return true;
            }
            cur = c.parent();
        }
        false
    }

    /// The root's listing is part of the scope (the mass-delete guard can only judge then).
    pub fn lists_root(&self) -> bool {
        self.regions
            .get(&RelPath::root())
            .is_some_and(|d| *d >= Depth::Children)
    }

    /// The number of regions (ancestors included).
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// Bounds the scope to at most `limit` regions by giving up detail: the deepest regions
    /// are replaced by their parents' whole subtrees, level by level, down to the whole tree
    /// at worst. What was covered stays covered.
    pub fn roll_up(&mut self, limit: usize) {
        while self.regions.len() > limit.max(1) {
            let depth = |p: &RelPath| {
                if p.is_root() {
                    0
                } else {
                    1 + p.as_bytes().iter().filter(|b| **b == b'/').count()
                }
            };
            let deepest = self.regions.keys().map(depth).max().unwrap_or(0);
            if deepest == 0 {
                break;
            }
            let at: Vec<RelPath> = self.regions.keys().filter(|p| depth(p) == deepest).cloned().collect();
            for p in at {
                self.regions.remove(&p);
                if let Some(parent) = p.parent() {
                    self.add(parent, Depth::Tree);
                }
            }
        }
        if self.regions.len() > limit.max(1) {
            *self = Scope::full();
        }
    }

    /// The regions as a list, for the wire.
    pub fn to_list(&self) -> Vec<(RelPath, Depth)> {
        self.regions.iter().map(|(p, d)| (p.clone(), *d)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    fn list(s: &Scope) -> Vec<(String, Depth)> {
        s.regions()
            .map(|(p, d)| (String::from_utf8(p.as_bytes().to_vec()).unwrap(), d))
            .collect()
    }

    #[test]
    fn normalizes() {
        use Depth::*;
        // (regions added in order, expected scope)
        let table: Vec<(Vec<(&str, Depth)>, Vec<(&str, Depth)>)> = vec![
            (vec![("a/b", Entry)], vec![("", Entry), ("a", Entry), ("a/b", Entry)]),
            (
                vec![("a/b", Entry), ("a", Children)],
                vec![("", Entry), ("a", Children), ("a/b", Entry)],
            ),
            (
                vec![("a/b", Tree), ("a/b/c", Children)],
                vec![("", Entry), ("a", Entry), ("a/b", Tree)],
            ),
            (
                vec![("a/b/c", Children), ("a/b/d", Entry), ("a/b", Tree)],
                vec![("", Entry), ("a", Entry), ("a/b", Tree)],
            ),
            (vec![("a", Tree), ("a", Entry)], vec![("", Entry), ("a", Tree)]),
            (vec![("x", Entry), ("", Tree)], vec![("", Tree)]),
            (vec![("", Children), ("ab", Entry)], vec![("", Children), ("ab", Entry)]),
            // "a b" sorts apart from "a/…" but is not beneath "a".
            (
                vec![("a", Tree), ("a b", Entry)],
                vec![("", Entry), ("a", Tree), ("a b", Entry)],
            ),
        ];
        for (adds, want) in table {
            let s = Scope::of(adds.iter().map(|(x, d)| (p(x), *d)));
            let want: Vec<(String, Depth)> = want.iter().map(|(x, d)| (x.to_string(), *d)).collect();
            assert_eq!(list(&s), want, "adding {adds:?}");
        }
    }

    #[test]
    fn rolls_up_into_parents_and_at_worst_the_whole_tree() {
        use Depth::*;
        // (regions, limit, expected scope)
        let table: Vec<(Vec<(&str, Depth)>, usize, Vec<(&str, Depth)>)> = vec![
            (vec![("a/b", Entry)], 3, vec![("", Entry), ("a", Entry), ("a/b", Entry)]),
            (
                vec![("a/b/c", Entry), ("a/b/d", Entry), ("x", Entry)],
                3,
                vec![("", Entry), ("a", Tree), ("x", Entry)],
            ),
            (
                vec![("a/b/c", Entry), ("a/b/d", Entry), ("x", Entry)],
                4,
                vec![("", Entry), ("a", Entry), ("a/b", Tree), ("x", Entry)],
            ),
            (vec![("a/b/c", Entry), ("x/y", Children)], 2, vec![("", Tree)]),
            (vec![("a", Tree), ("b", Tree), ("c", Tree)], 1, vec![("", Tree)]),
        ];
        for (adds, limit, want) in table {
            let mut s = Scope::of(adds.iter().map(|(x, d)| (p(x), *d)));
            s.roll_up(limit);
            let want: Vec<(String, Depth)> = want.iter().map(|(x, d)| (x.to_string(), *d)).collect();
            assert_eq!(list(&s), want, "rolling up {adds:?} to {limit}");
            assert!(s.len() <= limit.max(1));
            for (x, _) in &adds {
                assert!(
                    s.under_tree(&p(x)) || s.regions().any(|(r, _)| *r == p(x)),
                    "{x} is still covered"
                );
            }
        }
    }

    #[test]
    fn coverage() {
        let s = Scope::of([(p("a/b"), Depth::Tree), (p("c"), Depth::Children)]);
        assert!(s.under_tree(&p("a/b")));
        assert!(s.under_tree(&p("a/b/x/y")));
        assert!(!s.under_tree(&p("a")));
        assert!(!s.under_tree(&p("c/d")));
        assert!(!s.is_full());
        assert!(!s.lists_root());
        assert!(Scope::full().is_full());
        assert!(Scope::full().lists_root());
        assert!(Scope::of([(p(""), Depth::Children)]).lists_root());
    }
}
