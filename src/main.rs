//! `lorasweep`: one binary for the whole tool — local engine commands, the coordinator,
//! workers and the client verbs.

mod cli;

use clap::{Parser, Subcommand};

/// Find where LoRA adapters should go, train them there, and prove it with numbers.
#[derive(Parser)]
#[command(name = "lorasweep", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a chat reply with a model (and optionally an adapter).
    Generate(cli::engine::GenerateArgs),
    /// Run the PAGE probe over every candidate module and write its JSON.
    Probe(cli::engine::ProbeArgs),
    /// Train one adapter locally, without a coordinator.
    Train(cli::engine::TrainArgs),
    /// Check a sweep file and print its job counts; runs nothing.
    Validate(cli::validate::ValidateArgs),
}

fn main() -> std::process::ExitCode {
    cli::init_tracing();
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Generate(args) => cli::engine::generate(args),
        Command::Probe(args) => cli::engine::probe(args),
        Command::Train(args) => cli::engine::train(args),
        Command::Validate(args) => cli::validate::validate(args),
    };
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
