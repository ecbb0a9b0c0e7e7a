//! mirrorfs keeps a target directory an exact mirror of a source directory. The library holds
//! the replication core: the `FileSystem` interface (`fs`), validated paths (`path`), the wire
//! protocol (`protocol`), transports (`transport`), the target that applies requests (`target`),
//! reconcile (`reconcile`: scan, pure plan, apply), the source side (`source`, with the
//! mount's `Replicator`), the FUSE mount (`fuse`), the mount daemon's start (`daemon`) and watch mode (`watch`).

pub mod change;
pub mod cli;
pub mod control;
pub mod daemon;
pub mod fs;
pub mod fuse;
pub mod path;
pub mod progress;
pub mod protocol;
pub mod reconcile;
pub mod rpc;
pub mod session;
pub mod source;
pub mod sys;
pub mod target;
pub mod transport;
pub mod watch;

pub use change::Change;
pub use fs::{FileSystem, LocalFs, MemFs};
pub use path::RelPath;
pub use protocol::{Reply, Request, Response};
pub use rpc::{Rpc, RpcError};
pub use source::{ReplicatorSource, SyncError, SyncOptions};
pub use target::ReplicatorTarget;
