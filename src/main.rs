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
    /// Turn another engine's workflows into herald Workflows (YAML).
    #[command(subcommand)]
    Import(Import),
}

#[derive(Subcommand)]
enum Import {
    /// Knock workflows as `knock pull` or `knock workflow pull` wrote them.
    ///
    /// DIR is a Knock `workflows` directory, the Knock directory holding it (or
    /// a project whose knock.json names it), or one workflow's directory.
    /// Prints one Workflow per Knock workflow, or writes `<name>.yaml` files
    /// with -o. Anything herald cannot reproduce faithfully fails the import,
    /// one line per problem, and nothing is written, unless --lossy.
    Knock {
        dir: PathBuf,
        /// Write one `<name>.yaml` per workflow into this folder instead of printing.
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
        /// KNOCK_CHANNEL_KEY=HERALD_CHANNEL: the herald Channel for a Knock channel (default: the same name). Repeatable.
        #[arg(long = "channel", value_name = "KNOCK=HERALD", value_parser = key_value)]
        channels: Vec<(String, String)>,
        /// KNOCK_CHANNEL_KEY=TYPE (email, chat, http, in_app_feed, sms, push): for steps whose workflow.json does not say. Repeatable.
        #[arg(long = "channel-type", value_name = "KNOCK=TYPE", value_parser = key_value)]
        channel_types: Vec<(String, String)>,
        /// Import what can be imported: drop (or keep as written) what herald cannot reproduce, with a warning on stderr for each.
        #[arg(long)]
        lossy: bool,
    },
}

fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

/// `herald import knock`: prints or writes the Workflows; exit code 1 (and
/// nothing written) when there are problems and not --lossy.
fn import_knock(dir: &std::path::Path, output: Option<PathBuf>, options: herald::import::knock::Options, lossy: bool) -> anyhow::Result<std::process::ExitCode> {
    let imported = herald::import::knock::import(dir, &options)?;
    let problems: Vec<_> = imported.iter().flat_map(|i| i.problems.iter()).collect();
    if !problems.is_empty() && !lossy {
        for p in &problems {
            eprintln!("error: {p}");
        }
        eprintln!(
            "{} problem(s) in {} workflow(s); nothing written (--lossy imports anyway, dropping what herald cannot reproduce)",
            problems.len(),
            imported.iter().filter(|i| !i.problems.is_empty()).count()
        );
        return Ok(std::process::ExitCode::from(1));
    }
    for p in &problems {
        eprintln!("warning: {p}");
    }
    let documents: Vec<(String, String)> =
        imported.iter().map(|i| Ok((i.workflow.metadata.name.clone().unwrap_or_default(), herald::import::knock::to_yaml(&i.workflow)?))).collect::<anyhow::Result<_>>()?;
    match output {
        None => {
            for (_, yaml) in documents {
                print!("---\n{yaml}");
            }
        }
        Some(out) => {
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            for (name, yaml) in documents {
                let path = out.join(format!("{name}.yaml"));
                std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Two malloc arenas, not glibc's default of eight per core: rendering moves
/// recipients onto tokio's blocking threads (`controller::cpu`), and an arena
/// per thread kept what they freed. Measured with heaptrack and
/// `benches/capacity.rs`: a 50,000-recipient fan-out's live heap stayed near
/// 25 MB while RSS grew by 89 MiB with the default arenas, 51 MiB with two.
/// Called before any thread starts, as `MALLOC_ARENA_MAX` would be read; the
/// variable, when set, still wins.
fn few_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; no other thread exists yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Import(Import::Knock { dir, output, channels, channel_types, lossy }) => {
            let options = herald::import::knock::Options { channels: channels.into_iter().collect(), channel_types: channel_types.into_iter().collect() };
            import_knock(&dir, output, options, lossy)
        }
        Command::Crds { dir: None } => {
            for crd in herald::crds::all() {
                print!("---\n{}", herald::crds::to_yaml(&crd));
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Crds { dir: Some(dir) } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for crd in herald::crds::all() {
                let path = dir.join(herald::crds::file_name(&crd));
                std::fs::write(&path, herald::crds::to_yaml(&crd)).with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Run(settings) => {
            few_malloc_arenas();
            herald::telemetry::init(settings.log_format);
            let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            runtime.block_on(async move {
                let config = kube::Config::infer().await.context("connecting to Kubernetes (kubeconfig or in-cluster)")?;
                let client = herald::operator::client(config, &settings)?;
                herald::operator::run(client, *settings, herald::operator::shutdown_signal()).await
            })?;
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}
