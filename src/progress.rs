//! Progress display for long jobs: a bar with files, bytes and rate on a terminal, nothing when
//! quiet or when stderr is not a terminal (scripts, logs).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

#[derive(Clone)]
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    pub fn hidden() -> Progress {
        Progress { bar: None }
    }

    /// A bar over `total_bytes` that shows only when `enabled` and stderr is a terminal.
    pub fn new(enabled: bool, total_bytes: u64) -> Progress {
        if !enabled || !std::io::stderr().is_terminal() {
            return Progress::hidden();
        }
        let bar = ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Progress { bar: Some(bar) }
    }

    /// More bytes to come than the bar knew of (a plan that grows as the walk goes on).
    pub fn add_total(&self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc_length(bytes);
        }
    }

    pub fn file_done(&self, files: u64, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
            b.set_message(format!("{files} files"));
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
