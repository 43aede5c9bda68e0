//! `lorasweep validate FILE`: check a sweep file and count its jobs, running nothing.

use std::path::PathBuf;

use clap::Args;
use lorasweep_coordinator::graph::JobGraph;
use lorasweep_coordinator::spec::{LoadError, Sweep};

/// Arguments of `lorasweep validate`.
#[derive(Args)]
pub struct ValidateArgs {
    /// The sweep file (YAML).
    pub file: PathBuf,
}

/// Validates the sweep and prints its job counts; every error goes to stderr, one a line.
pub fn validate(args: ValidateArgs) -> anyhow::Result<()> {
    let sweep = match Sweep::from_file(&args.file) {
        Ok(sweep) => sweep,
        Err(LoadError::Invalid(errors)) => {
            for error in &errors.0 {
                eprintln!("{error}");
            }
            let count = errors.0.len();
            let noun = if count == 1 { "error" } else { "errors" };
            anyhow::bail!(
                "{} is not a valid sweep: {count} {noun}",
                args.file.display()
            );
        }
        Err(other) => return Err(other.into()),
    };
    let counts = JobGraph::plan(&sweep).counts();
    println!(
        "sweep {}: {} model(s) × {} task(s) × {} point(s)",
        sweep.name,
        sweep.models.len(),
        sweep.tasks.len(),
        sweep.point_count()
    );
    println!("  probe  {:>6}", counts.probe);
    println!("  train  {:>6}", counts.train);
    println!("  eval   {:>6}", counts.eval);
    println!("  total  {:>6}", counts.total());
    Ok(())
}
