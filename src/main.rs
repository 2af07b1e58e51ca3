//! The `sandboxd` command: parses arguments, loads the configuration and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use sandboxd::auth::{self, Auth};
use sandboxd::config::{parse_duration, Config, LogFormat};
use sandboxd::user::UserId;

/// jemalloc rather than glibc's malloc: with thousands of connections and tunnels opened and
/// closed, glibc kept the freed memory in its arenas (78 MiB with 5,000 idle tunnels, 43 MiB
/// still 30 s after they closed); jemalloc's size-class slabs fragment less and its background
/// thread gives freed pages back (64 MiB, and 29 MiB 3 s after they closed, in bench/run).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options: a background thread returns freed pages to the kernel after 1 s, at once
/// with `MADV_DONTNEED` (`muzzy_decay_ms:0`): pages given back lazily (`MADV_FREE`) still count
/// in the RSS until the kernel is short of memory (5,000 idle tunnels: 67 MiB instead of 71 MiB
/// in bench/run, back to 31.5 MiB 2 s after they closed).
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: MallocConf =
    MallocConf(c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr());

/// jemalloc reads `malloc_conf` as a C `const char *`: a thin pointer, not a Rust slice.
#[repr(transparent)]
pub struct MallocConf(*const std::ffi::c_char);

// SAFETY: the pointer is to a static, immutable C string.
unsafe impl Sync for MallocConf {}

#[derive(Parser)]
#[command(
    name = "sandboxd",
    version,
    about = "Per-user Docker sandboxes behind one Rust edge"
)]
struct Cli {
    /// Configuration file (default: $SANDBOXD_CONFIG, else config/sandboxd.toml when present).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server.
    Serve,
    /// Print a bearer token for a user.
    Token {
        user: String,
        /// Lifetime, e.g. 30m, 24h, 7d.
        #[arg(long, default_value = "24h")]
        ttl: String,
    },
    /// List every sandbox: user, state, container, created, last activity, memory in use.
    Ps,
    /// Show a user's sandbox events (newest last).
    Events {
        user: String,
        /// How many of the newest events to show.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..=100_000))]
        limit: i64,
    },
    /// Stop a user's sandbox (the container and the workspace stay; the next request wakes it).
    Stop { user: String },
    /// Manage the sandbox image.
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Build the sandbox image (skipped when it is up to date).
    Build {
        /// Build the base from Debian packages instead of pulling node:20.
        #[arg(long)]
        offline: bool,
        /// Rebuild even when up to date.
        #[arg(long)]
        force: bool,
    },
}

fn load_config(path: Option<PathBuf>) -> anyhow::Result<Config> {
    let path = path
        .or_else(|| std::env::var_os("SANDBOXD_CONFIG").map(PathBuf::from))
        .or_else(|| {
            let p = PathBuf::from("config/sandboxd.toml");
            p.exists().then_some(p)
        });
    Config::load(path.as_deref(), std::env::vars())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sandboxd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Log lines on stderr, in the configured format; the level from `SANDBOXD_LOG` (default info).
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SANDBOXD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        // Colours only for a terminal, not for a file or a log collector.
        LogFormat::Text => fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // One object per line: the event's fields at the top level, the request's span
        // (request_id, user) under "span".
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let cfg = load_config(cli.config)?;
    init_logging(cfg.log_format);
    match cli.cmd {
        Cmd::Serve => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(serve(cfg))
        }
        Cmd::Token { user, ttl } => {
            let user = UserId::parse(&user).context("invalid user id")?;
            let ttl: Duration =
                parse_duration(&ttl).context("invalid --ttl (e.g. 30m, 24h, 7d)")?;
            let auth = Auth::new(&auth::load_secret(&cfg)?);
            println!("{}", auth.issue(&user, ttl)?);
            Ok(())
        }
        Cmd::Ps | Cmd::Events { .. } | Cmd::Stop { .. } => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(operator(cfg, cli.cmd))
        }
        Cmd::Image {
            cmd: ImageCmd::Build { offline, force },
        } => {
            let script = PathBuf::from("sandbox-image/build.sh");
            if !script.exists() {
                bail!("sandbox-image/build.sh not found: run this from the sandboxd checkout");
            }
            let mut c = std::process::Command::new("bash");
            c.arg(&script).env("SANDBOXD_IMAGE", &cfg.image);
            if offline {
                c.arg("--offline");
            }
            if force {
                c.arg("--force");
            }
            let status = c.status().context("running sandbox-image/build.sh")?;
            if !status.success() {
                bail!("image build failed ({status})");
            }
            Ok(())
        }
    }
}

/// `ps`, `events`, `stop`: the same store and engine as the server (src/operator.rs).
async fn operator(cfg: Config, cmd: Cmd) -> anyhow::Result<()> {
    use sandboxd::operator as op;
    let parse = |u: &str| UserId::parse(u).context("invalid user id");
    match cmd {
        Cmd::Ps => {
            let store = op::open_store(&cfg).await?;
            let engine = op::open_inventory(&cfg).await?;
            print!("{}", op::render_ps(&op::ps(&cfg, &store, &engine).await?));
        }
        Cmd::Events { user, limit } => {
            let user = parse(&user)?;
            let store = op::open_store(&cfg).await?;
            print!(
                "{}",
                op::render_events(&op::events(&store, &user, limit).await?)
            );
        }
        Cmd::Stop { user } => {
            let user = parse(&user)?;
            let store = op::open_store(&cfg).await?;
            let engine = op::open_inventory(&cfg).await?;
            match op::stop(&cfg, &store, &engine, &user).await? {
                op::StopOutcome::Stopped(c) => println!("stopped {user} (container {c})"),
                op::StopOutcome::AlreadyStopped(c) => {
                    println!("{user} is already stopped (container {c})")
                }
            }
        }
        _ => unreachable!("not an operator command"),
    }
    Ok(())
}

/// A proxy needs a descriptor per client and per upstream connection: raise the soft limit of
/// open files to the hard limit (the default soft limit of 1024 is far below `max_connections`).
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::warn!("could not raise the open-files limit");
            }
        }
    }
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    raise_nofile();
    let running = sandboxd::startup::build(cfg).await?;
    let cfg = running.config().clone();
    if let Some(a) = running.http_addr {
        tracing::info!("listening on http://{a}");
    }
    if let Some(a) = running.https_addr {
        tracing::info!("listening on https://{a}");
    }
    if let Some(a) = running.metrics_addr {
        tracing::info!("metrics on http://{a}/metrics");
    }
    if let Some(ca) = &running.dev_ca {
        tracing::info!(
            "development CA: {} (trust it: cp it to /usr/local/share/ca-certificates/sandboxd-dev.crt && update-ca-certificates, or curl --cacert {})",
            ca.display(),
            ca.display()
        );
    }
    tracing::info!(domain = %cfg.domain, preview = %format!("user-<id>.{}", cfg.preview_domain), "ready");
    running.run_until_signal().await
}
