//! The `mirrorfs` binary: parses the command line, runs the command, and turns errors into a
//! message on stderr and an exit code (0 success, 1 differences found by verify, 2 error,
//! 23 sync finished with per-path problems, as rsync's "partial transfer").

use clap::Parser;
use mirrorfs::cli::{self, Cli, Command, ServeArgs, SyncArgs, TargetArgs};
use mirrorfs::transport::{self, server::Listen};
use mirrorfs::{LocalFs, RelPath, ReplicatorSource, SyncOptions};
use std::process::ExitCode;
use std::sync::Arc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level)).init();
    let r = match cli.command {
        Command::Sync(a) => sync(a),
        Command::Verify(a) => verify(a),
        Command::Serve(a) => serve(a),
    };
    match r {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("mirrorfs: error: {msg}");
            ExitCode::from(2)
        }
    }
}

fn connect(a: &TargetArgs) -> Result<(Arc<LocalFs>, mirrorfs::transport::Client), String> {
    let src = cli::check_source(&a.src)?;
    let ep = cli::check_target(&a.target, &src)?;
    let fs = Arc::new(LocalFs::new(&src).map_err(|e| format!("source: {e}"))?);
    let client = transport::connect(&ep, a.token_file.as_deref(), None).map_err(|e| format!("target {ep}: {e}"))?;
    Ok((fs, client))
}

fn sync(a: SyncArgs) -> Result<ExitCode, String> {
    let (fs, client) = connect(&a.target)?;
    let opts = SyncOptions {
        checksum: a.checksum,
        allow_mass_delete: a.allow_mass_delete,
        progress: !a.target.quiet,
    };
    let started = std::time::Instant::now();
    let source = ReplicatorSource::with_options(fs, RelPath::root(), client, opts).map_err(|e| e.to_string())?;
    let r = source.last_report().clone();
    drop(source);
    for p in &r.problems {
        eprintln!("mirrorfs: {p}");
    }
    if !a.target.quiet {
        eprintln!(
            "synced in {:.2}s: {} operations, {} files sent ({} as deltas), {} content bytes, {} bytes on the wire{}",
            started.elapsed().as_secs_f64(),
            r.ops,
            r.files_sent,
            r.delta_files,
            r.content_bytes,
            r.wire_bytes,
            if r.problems.is_empty() {
                String::new()
            } else {
                format!(", {} problems", r.problems.len())
            }
        );
    }
    Ok(if r.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(23)
    })
}

fn verify(a: TargetArgs) -> Result<ExitCode, String> {
    let (fs, client) = connect(&a)?;
    // Building a source reconciles; verify must not change anything, so it uses the parts.
    let diffs = mirrorfs::source::verify_only(fs, RelPath::root(), &client).map_err(|e| e.to_string())?;
    for d in &diffs {
        println!("{d}");
    }
    if !a.quiet {
        eprintln!("{} differences", diffs.len());
    }
    Ok(if diffs.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn serve(a: ServeArgs) -> Result<ExitCode, String> {
    let meta = std::fs::metadata(&a.dir).map_err(|e| format!("target directory {}: {e}", a.dir.display()))?;
    if !meta.is_dir() {
        return Err(format!("target directory {} is not a directory", a.dir.display()));
    }
    if a.stdio {
        let fs: Arc<dyn mirrorfs::FileSystem> = Arc::new(LocalFs::new(&a.dir).map_err(|e| e.to_string())?);
        let key = a
            .token_file
            .as_deref()
            .map(transport::auth::load_key)
            .transpose()
            .map_err(|e| e.to_string())?;
        transport::serve_stream(Box::new(std::io::stdin()), Box::new(std::io::stdout()), fs, key);
        return Ok(ExitCode::SUCCESS);
    }
    let l = Listen::parse(a.listen.as_deref().unwrap_or_default())?;
    transport::listen(&l, &a.dir, a.token_file.as_deref(), |addr| {
        log::info!("serving {} on {addr}", a.dir.display());
        eprintln!("mirrorfs: serving {} on {addr}", a.dir.display());
    })
    .map_err(|e| e.to_string())?;
    Ok(ExitCode::SUCCESS)
}
