use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

/// herald: Knock-style notification workflows as Kubernetes resources.
#[derive(Parser)]
#[command(name = "herald", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the operator against the current kubeconfig (or in-cluster config).
    Run(Box<herald::settings::Settings>),
    /// Print every CRD as YAML, or write one file per kind into a folder.
    Crds {
        /// Write `<kind>.yaml` files into this folder instead of printing.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crds { dir: None } => {
            for crd in herald::crds::all() {
                print!("---\n{}", herald::crds::to_yaml(&crd));
            }
            Ok(())
        }
        Command::Crds { dir: Some(dir) } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for crd in herald::crds::all() {
                let path = dir.join(herald::crds::file_name(&crd));
                std::fs::write(&path, herald::crds::to_yaml(&crd)).with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(())
        }
        Command::Run(settings) => {
            herald::telemetry::init(settings.log_format);
            let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            runtime.block_on(async move {
                let config = kube::Config::infer().await.context("connecting to Kubernetes (kubeconfig or in-cluster)")?;
                let client = herald::operator::client(config, &settings)?;
                herald::operator::run(client, *settings, herald::operator::shutdown_signal()).await
            })
        }
    }
}
