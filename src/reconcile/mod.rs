//! Reconcile: make a target tree equal to a source tree, writing only what differs. It is split in
//! three: `scan` reads a tree through the `FileSystem` interface into a `Snapshot` (I/O);
//! `plan::plan` compares two snapshots and returns the operations to run (pure, no I/O, tested
//! with tables); `apply` runs a plan against a target through an `Rpc`, moving content whole or as
//! rsync deltas.

pub mod apply;
pub mod plan;
pub mod scan;
pub mod scope;

pub use apply::{execute, ApplyOptions, Exec, Report};
pub use plan::{describe, plan, plan_stream, NotMirrored, Op, Plan, PlanError, PlanOptions};
pub use scan::{scan, scan_scope, Entries, Entry, ScanOptions, ListingHook, Snapshot, Walk};
pub use scope::{Depth, Scope};
