//! The `umbra` binary: parses the command line, sets up logging, loads and
//! validates the configuration, runs the server until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;
use umbra_broker::cli::{
    self, ApiArgs, CertsCommand, ChangesArgs, PasswdArgs, ShadowCommand, ThingCommand,
};
use umbra_broker::embedded::ListenerSettings;
use umbra_broker::server::StartError;
use umbra_broker::{Config, CursorJumpLayer, Overrides, Server};
use umbra_shadow::store::StoreError;

/// jemalloc, not glibc's malloc: allocation was the largest single part of
/// the CPU profile, and jemalloc also keeps less resident per idle device
/// (measured side by side in `bench/RESULTS.md`).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit code for a usage or configuration error (sysexits.h EX_USAGE).
const EX_USAGE: u8 = 64;

/// Umbra: an MQTT broker with an AWS IoT compatible device shadow service.
///
/// With no arguments it runs with embedded defaults: MQTT on 127.0.0.1:1883,
/// MQTT over WebSocket on 127.0.0.1:8083, the HTTP API on 127.0.0.1:8080,
/// data in ./umbra-data/. Settings come
/// from the defaults, then the config file, then UMBRA_* variables, then flags.
#[derive(Debug, Parser)]
#[command(name = "umbra", version)]
struct Cli {
    /// TOML configuration file (see the README's configuration reference).
    #[arg(long, env = "UMBRA_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// MQTT 3.1.1/5 TCP listener address (overrides [mqtt.mqtt_v4] addr).
    #[arg(long, env = "UMBRA_MQTT_ADDR", value_name = "ADDR")]
    mqtt_addr: Option<SocketAddr>,
    /// MQTT over WebSocket listener address (overrides [mqtt.websocket] addr).
    #[arg(long, env = "UMBRA_WS_ADDR", value_name = "ADDR")]
    ws_addr: Option<SocketAddr>,
    /// Operator HTTP API address (overrides http_addr).
    #[arg(long, env = "UMBRA_HTTP_ADDR", value_name = "ADDR")]
    http_addr: Option<SocketAddr>,
    /// Directory for the SQLite database (overrides data_dir).
    #[arg(long, env = "UMBRA_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// A PostgreSQL URL: keep shadows there, not in SQLite (overrides
    /// [store] url).
    #[arg(
        long,
        env = "UMBRA_STORE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    store_url: Option<String>,
    /// Serve shadow requests as a client of this MQTT broker
    /// (`mqtt://host:port`) instead of running one (overrides [mqtt] attach).
    #[arg(long, env = "UMBRA_ATTACH", value_name = "URL")]
    attach: Option<String>,
    /// How the operator commands reach a server (global: before or after
    /// the command).
    #[command(flatten)]
    api: ApiArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

/// Without a command, umbra runs the server.
#[derive(Debug, Subcommand)]
enum Command {
    /// Read and change shadows through a running server's HTTP API.
    Shadow {
        #[command(subcommand)]
        command: ShadowCommand,
    },
    /// The fleet at a glance: things, connected, shadows in sync and with a
    /// delta (a running server's `GET /v1/fleet`).
    Fleet,
    /// Delete things through a running server's HTTP API.
    Thing {
        #[command(subcommand)]
        command: ThingCommand,
    },
    /// Print committed changes (shadow updates and deletes, connects, disconnects).
    Changes {
        #[command(flatten)]
        changes: ChangesArgs,
    },
    /// Set or remove a device's password in a password file (argon2id).
    Passwd(PasswdArgs),
    /// Make a development CA, a server certificate and device certificates.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Copy the database (of --data-dir or the config's data_dir) to FILE,
    /// consistent as of one commit, while the server runs (see the README's
    /// "Backup and restore").
    Backup { file: PathBuf },
    /// Load shadows from FILE (JSON lines of {"thing","name","state"}; - for
    /// stdin) into the store (the data directory's, or --store-url), as
    /// updates through the shadow rules and group commit. Umbra must not be
    /// running on that data directory.
    Import {
        file: PathBuf,
        /// Lines read and submitted in the order of shadow names at a time
        /// (fewer: less memory; more: faster for a file not in name order).
        #[arg(long, default_value_t = umbra_shadow::import::SORT_CHUNK)]
        sort_chunk: usize,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let code = if err.use_stderr() { EX_USAGE } else { 0 };
            // Printing help or a usage error can only fail if stdout/stderr is gone.
            let _ = err.print();
            return ExitCode::from(code);
        }
    };
    let overrides = Overrides {
        mqtt_addr: cli.mqtt_addr,
        ws_addr: cli.ws_addr,
        http_addr: cli.http_addr,
        data_dir: cli.data_dir,
        store_url: cli.store_url,
        attach: cli.attach,
    };
    if let Some(command) = cli.command {
        return run_command(&cli.api, cli.config.as_deref(), &overrides, command);
    }
    tracing_subscriber::registry()
        .with(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                // Colour only on a terminal, not in files or pipes.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .with(CursorJumpLayer)
        .init();

    let config = match Config::load(cli.config.as_deref(), &overrides) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("umbra: invalid configuration: {err}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("umbra: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("umbra: {}", describe(&err));
            // Another process on the data directory: a usage error, like a bad config.
            let locked = matches!(
                err.downcast_ref::<StartError>(),
                Some(StartError::Store(StoreError::Locked { .. }))
            );
            ExitCode::from(if locked { EX_USAGE } else { 1 })
        }
    }
}

/// The error and its causes, leaving out a cause that the message before
/// it already says (most of Umbra's messages include their cause).
fn describe(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Exit code for input data with errors (sysexits.h EX_DATAERR).
const EX_DATAERR: u8 = 65;

/// Jobs an import keeps queued for the writer, and the most it commits at once.
const IMPORT_QUEUE: usize = 16_384;
const IMPORT_BATCH: usize = 4096;

/// `umbra import FILE`.
fn import(
    config: Option<&std::path::Path>,
    overrides: &Overrides,
    file: &std::path::Path,
    sort_chunk: usize,
) -> ExitCode {
    use std::io::BufRead;
    let mut config = match load_config(config, overrides) {
        Ok(config) => config,
        Err(code) => return code,
    };
    config.store.max_batch = IMPORT_BATCH;
    config.store.queue_capacity = IMPORT_QUEUE;
    let input: Box<dyn BufRead> = if file.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        match std::fs::File::open(file) {
            Ok(f) => Box::new(std::io::BufReader::with_capacity(1 << 20, f)),
            Err(err) => {
                eprintln!("umbra: cannot open {}: {err}", file.display());
                return ExitCode::from(EX_USAGE);
            }
        }
    };
    if config.store.url.is_none() {
        if let Err(err) = std::fs::create_dir_all(&config.data_dir) {
            eprintln!("umbra: cannot create {}: {err}", config.data_dir.display());
            return ExitCode::FAILURE;
        }
    }
    let (store, mut committed) = match umbra_broker::server::open_store(&config, None, false) {
        Ok(opened) => opened,
        Err(err @ StoreError::Locked { .. }) => {
            eprintln!("umbra: {err}");
            return ExitCode::from(EX_USAGE);
        }
        Err(err) => {
            eprintln!("umbra: cannot open the shadow store: {err}");
            return ExitCode::FAILURE;
        }
    };
    let started = std::time::Instant::now();
    let rate = |n: u64| n as f64 / started.elapsed().as_secs_f64().max(1e-9);
    let result = umbra_shadow::import::import(
        input,
        &*store,
        &mut committed,
        &config.shadow,
        IMPORT_QUEUE,
        sort_chunk,
        |line, reason| eprintln!("umbra: line {line}: {reason}"),
        |p| {
            eprintln!(
                "umbra: {} imported, {} refused ({:.0}/s)",
                p.imported,
                p.refused,
                rate(p.imported)
            )
        },
    );
    let closed = store.close();
    match (result, closed) {
        (Ok(done), Ok(())) => {
            println!(
                "umbra: imported {} shadows from {} lines in {:.1} s ({:.0}/s) into {}; {} lines refused",
                done.imported,
                done.lines,
                started.elapsed().as_secs_f64(),
                rate(done.imported),
                store_name(&config),
                done.refused
            );
            if done.refused > 0 {
                ExitCode::from(EX_DATAERR)
            } else {
                ExitCode::SUCCESS
            }
        }
        (Err(err), _) => {
            eprintln!("umbra: import failed: {err}");
            ExitCode::FAILURE
        }
        (_, Err(err)) => {
            eprintln!("umbra: import failed: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Where the shadows are, for a message (not a PostgreSQL URL: it may hold
/// a password).
fn store_name(config: &Config) -> String {
    match &config.store.url {
        Some(_) => "the PostgreSQL store ([store] url)".to_string(),
        None => config.database_path().display().to_string(),
    }
}

/// The configuration a local command works with; exit 64 when it is invalid.
fn load_config(
    config: Option<&std::path::Path>,
    overrides: &Overrides,
) -> Result<Config, ExitCode> {
    Config::load(config, overrides).map_err(|err| {
        eprintln!("umbra: invalid configuration: {err}");
        ExitCode::from(EX_USAGE)
    })
}

/// `umbra backup FILE`.
fn backup(
    config: Option<&std::path::Path>,
    overrides: &Overrides,
    file: &std::path::Path,
) -> ExitCode {
    let config = match load_config(config, overrides) {
        Ok(config) => config,
        Err(code) => return code,
    };
    if config.store.url.is_some() {
        eprintln!(
            "umbra: the store is PostgreSQL ([store] url); back it up with PostgreSQL's own tools (pg_dump)"
        );
        return ExitCode::from(EX_USAGE);
    }
    let database = config.database_path();
    if !database.exists() {
        eprintln!("umbra: no database at {}", database.display());
        return ExitCode::from(EX_USAGE);
    }
    match umbra_shadow::store::backup(&database, file) {
        Ok(pages) => {
            println!(
                "umbra: backed up {} to {} ({pages} pages)",
                database.display(),
                file.display()
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("umbra: backup failed: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a command instead of the server: an operator command against a
/// running server, or a local one.
fn run_command(
    api: &ApiArgs,
    config: Option<&std::path::Path>,
    overrides: &Overrides,
    command: Command,
) -> ExitCode {
    let mut out = std::io::stdout().lock();
    let result = match command {
        Command::Shadow { command } => cli::run_shadow(api, &command, &mut out),
        Command::Thing { command } => cli::run_thing(api, &command, &mut out),
        Command::Fleet => cli::run_fleet(api, &mut out),
        Command::Changes { changes } => cli::run_changes(api, &changes, &mut out),
        Command::Certs { command } => cli::run_certs(&command, &mut out),
        Command::Passwd(args) => cli::run_passwd(&args, &mut std::io::stdin().lock(), &mut out),
        Command::Backup { file } => return backup(config, overrides, &file),
        Command::Import { file, sort_chunk } => {
            return import(config, overrides, &file, sort_chunk)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("umbra: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let data_dir = config.data_dir.clone();
    let transport = |listener: &Option<ListenerSettings>| match listener
        .as_ref()
        .and_then(|l| l.tls.as_ref())
    {
        None => "plain",
        Some(tls) if tls.requires_client_cert() => "TLS, client certificates required",
        Some(tls) if tls.client_ca.is_some() => "TLS, client certificates accepted",
        Some(_) => "TLS",
    };
    let kinds = [
        transport(&config.mqtt.mqtt_v4),
        transport(&config.mqtt.mqtt_v5),
        transport(&config.mqtt.websocket),
    ];
    let anonymous = config.mqtt.auth.is_none() && config.mqtt.password_file.is_none();
    let attached = config
        .mqtt
        .attach
        .clone()
        .map(|url| (url, config.mqtt.attach_client.clone()));
    let store = match &config.store.url {
        Some(_) => "in PostgreSQL ([store] url)".to_string(),
        None => format!("in {}", data_dir.display()),
    };
    let server = Server::start(config).await?;
    let addrs = server.addrs();
    println!(
        "umbra: http listening on {} (API document: http://{}/openapi.json)",
        addrs.http, addrs.http
    );
    for ((what, addr), kind) in [
        ("mqtt", addrs.mqtt),
        ("mqtt-v5", addrs.mqtt_v5),
        ("websocket", addrs.websocket),
    ]
    .into_iter()
    .zip(kinds)
    {
        if let Some(addr) = addr {
            println!("umbra: {what} listening on {addr} (MQTT 3.1.1 and 5, {kind})");
        }
    }
    if let Some((url, client)) = attached {
        println!(
            "umbra: attached to {url} as {:?}, taking shadow requests in share group {:?} (no broker of its own)",
            client.client_id, client.share_group
        );
    }
    println!("umbra: data {store}");
    println!(
        "umbra: try   curl -d '{{\"state\":{{\"desired\":{{\"on\":true}}}}}}' http://{}/things/lamp-1/shadow",
        addrs.http
    );
    if let Some(mqtt) = addrs.mqtt.filter(|_| anonymous && kinds[0] == "plain") {
        println!(
            "umbra: watch mosquitto_sub -h {} -p {} -i lamp-1 -t '$aws/things/lamp-1/shadow/update/delta' -v",
            mqtt.ip(),
            mqtt.port()
        );
    }
    shutdown_signal().await?;
    println!("umbra: shutting down");
    server.shutdown().await;
    println!("umbra: stopped");
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result?,
        _ = term.recv() => {}
    }
    Ok(())
}
