//! The `device-sim` binary: parses the command line, sets up logging and Ctrl-C, runs the
//! library and prints the summary.

use anyhow::Context as _;
use clap::Parser;
use device_sim::cli::{BenchCommand, Cli, Command};
use device_sim::{demo, fleet, operator, plot, relay, shadow_bench};
use std::io::Write as _;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("device-sim: {e:#}");
            if e.downcast_ref::<device_sim::Error>()
                .is_some_and(|e| matches!(e, device_sim::Error::Config(_)))
            {
                ExitCode::from(64)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let on_ctrl_c = shutdown.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("device-sim: interrupted, shutting down");
                on_ctrl_c.cancel();
            }
        });
        let summary = match &cli.command {
            Command::Fleet(args) => fleet::run(args.config(cli.quiet), shutdown).await?,
            Command::Operator(args) => operator::run(args.config(cli.quiet), shutdown).await?,
            Command::Demo(args) => demo::run(args.config(cli.quiet), shutdown).await?,
            Command::Bench(BenchCommand::Relay(args)) => {
                relay::run(args.config(cli.quiet), shutdown).await?
            }
            Command::Bench(BenchCommand::Shadow(args)) => {
                shadow_bench::run(args.config(cli.quiet), shutdown).await?
            }
        };
        if let Some(path) = &cli.plot {
            if let Some(note) = plot::write(path, &summary)? {
                eprintln!("device-sim: {note}");
            }
        }
        if cli.json {
            eprint!("{}", summary.table());
            let json = serde_json::to_string_pretty(&summary).context("encoding the summary")?;
            let mut stdout = std::io::stdout().lock();
            writeln!(stdout, "{json}").context("writing the summary")?;
        } else {
            print!("{}", summary.table());
        }
        Ok(())
    })
}
