//! `Changed`: the paths a target has not caught up with, as a bounded `Scope`. Every change the
//! source made while the target was away (or that the target refused, or that was in flight at
//! the moment of loss) lands here, and a catch-up reconciles exactly this scope. Past its bound
//! it rolls up into parent directories, and at worst into the whole tree, so memory stays bounded
//! however long the outage.

use crate::change::Change;
use crate::path::RelPath;
use crate::reconcile::{Depth, Scope};

/// Regions kept before rolling up (a region costs about a hundred bytes).
pub const DEFAULT_LIMIT: usize = 100_000;

#[derive(Debug)]
pub struct Changed {
    scope: Scope,
    limit: usize,
}

impl Default for Changed {
    fn default() -> Self {
        Changed::new(DEFAULT_LIMIT)
    }
}

/// The regions a change touches on the target. A rename covers both subtrees (a directory
/// renamed while the target was away moves everything beneath it), a new directory its whole
/// subtree; everything else its entry, whose ancestors the scope adds (their mtimes changed).
pub fn regions(c: &Change) -> Vec<(RelPath, Depth)> {
    match c {
        Change::Rename { from, to, .. } => vec![(from.clone(), Depth::Tree), (to.clone(), Depth::Tree)],
        Change::Mkdir { path, .. } => vec![(path.clone(), Depth::Tree)],
        c => c.paths().into_iter().map(|p| (p.clone(), Depth::Entry)).collect(),
    }
}

impl Changed {
    pub fn new(limit: usize) -> Changed {
        Changed {
            scope: Scope::default(),
            limit,
        }
    }

    pub fn add(&mut self, p: RelPath, d: Depth) {
        self.scope.add(p, d);
        self.bound();
    }

    pub fn add_changes(&mut self, changes: &[Change]) {
        for c in changes {
            for (p, d) in regions(c) {
                self.scope.add(p, d);
            }
        }
        self.bound();
    }

    pub fn merge(&mut self, s: Scope) {
        self.scope.merge(s);
        self.bound();
    }

    fn bound(&mut self) {
        if self.scope.len() > self.limit {
            let before = self.scope.len();
            self.scope.roll_up(self.limit / 2);
            log::info!(
                "{before} changed paths kept for the catch-up: rolled up into {} regions",
                self.scope.len()
            );
        }
    }

    /// Everything, for the catch-up to reconcile; the set is empty after.
    pub fn take(&mut self) -> Scope {
        std::mem::take(&mut self.scope)
    }

    pub fn is_empty(&self) -> bool {
        self.scope.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.scope.is_full()
    }

    /// Regions kept (ancestors included): how far behind the target is, in `status`.
    pub fn len(&self) -> usize {
        self.scope.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn a_rename_marks_both_subtrees_and_the_set_stays_bounded() {
        let mut c = Changed::new(8);
        c.add_changes(&[Change::Rename {
            from: p("a/old"),
            to: p("b/new"),
            flags: 0,
        }]);
        let s = c.take();
        assert!(s.under_tree(&p("a/old/deep/file")));
        assert!(s.under_tree(&p("b/new/deep/file")));
        assert!(c.is_empty());
        for i in 0..1000 {
            c.add(p(&format!("d{}/f{i}", i % 7)), Depth::Entry);
            assert!(c.len() <= 8, "bounded at {i}: {}", c.len());
        }
        let s = c.take();
        for i in 0..1000 {
            assert!(s.under_tree(&p(&format!("d{}/f{i}", i % 7))), "f{i} still covered");
        }
    }
}
