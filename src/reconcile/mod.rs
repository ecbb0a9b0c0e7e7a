//! Reconcile: make a target tree equal to a source tree, writing only what differs, in memory that
//! follows the widest directory and the depth, not the size of the tree. It is split in three:
//! `scan` walks a tree through the `FileSystem` interface lazily, in sorted pre-order (`Walk`), or
//! reads a scope of it into a `Snapshot` (I/O); `plan::plan_stream` merges two such walks and
//! hands out the operations to run in batches (pure, no I/O, tested with tables; `plan` is it fed
//! from two snapshots); `apply::Exec` runs each batch against a target through an `Rpc`, moving
//! content whole or as rsync deltas. `scope` names the parts of a tree a partial reconcile covers.

pub mod apply;
pub mod plan;
pub mod scan;
pub mod scope;

pub use apply::{execute, ApplyOptions, Exec, Report};
pub use plan::{describe, plan, plan_stream, NotMirrored, Op, Plan, PlanError, PlanOptions};
pub use scan::{scan, scan_scope, Entries, Entry, ListingHook, ScanOptions, Snapshot, Walk};
pub use scope::{Depth, Scope};
