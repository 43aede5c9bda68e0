//! `lorasweep report`: a sweep's results as Markdown, CSV, JSON, SVG plots and one HTML
//! page, and a summary table on the terminal (see the `lorasweep-report` crate).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use sha2::{Digest, Sha256};

use lorasweep_coordinator::client::CoordinatorClient;
use lorasweep_coordinator::ids::SweepId;

use crate::cli::connect::ConnectArgs;
use lorasweep_report::{self as report, snapshot, ReportInput};

/// What `report` prints on standard output.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportFormat {
    /// The summary table.
    Table,
    /// The aggregated tables as one JSON document, for scripts.
    Json,
}

/// `lorasweep report`.
#[derive(Args, Debug)]
pub struct ReportArgs {
    /// The sweep id (as `submit` printed it).
    #[arg(required_unless_present = "from", conflicts_with = "from")]
    pub sweep: Option<SweepId>,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Make the report from a saved snapshot (the `data` folder of an earlier report)
    /// instead of asking a coordinator.
    #[arg(long)]
    pub from: Option<PathBuf>,
    /// Folder to write the report files into (its `data` folder keeps the results it was
    /// made from). Optional with `--format json`.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// What to print on standard output.
    #[arg(long, value_enum, default_value = "table")]
    pub format: ReportFormat,
}

/// `lorasweep report`.
pub fn report(args: ReportArgs) -> Result<()> {
    if args.out.is_none() && args.format == ReportFormat::Table {
        bail!("--out is required unless --format json");
    }
    let input = match (&args.from, args.sweep) {
        (Some(from), _) => snapshot::load(from)?,
        (None, Some(sweep)) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            let _context = runtime.enter();
            let client = crate::cli::connect::connect(&args.connect)?;
            let data = match &args.out {
                Some(out) => out.join("data"),
                None => std::env::temp_dir().join(format!(
                    "lorasweep-report-{}-{}",
                    sweep.0,
                    std::process::id()
                )),
            };
            let input = runtime.block_on(fetch(&client, sweep, &data));
            if args.out.is_none() {
                let _ = std::fs::remove_dir_all(&data);
            }
            input?
        }
        (None, None) => bail!("give a sweep id or --from"),
    };
    let built = report::build(&input);
    if let Some(out) = &args.out {
        let written = report::write(&report::render(&built)?, out)?;
        eprintln!(
            "wrote {} files to {} (open {})",
            written.len(),
            out.display(),
            out.join("report.html").display()
        );
    }
    match args.format {
        ReportFormat::Table => print!("{}", report::terminal::summary(&built)),
        ReportFormat::Json => print!("{}", report::tables::report_json(&built)?),
    }
    Ok(())
}

/// Fetches a sweep's results and its probes' `probe.json` into the snapshot folder `data`
/// (a probe file already there with the right digest is kept), then reads it back.
pub async fn fetch(client: &CoordinatorClient, sweep: SweepId, data: &Path) -> Result<ReportInput> {
    let results = client
        .results(sweep)
        .await
        .with_context(|| format!("cannot fetch the results of sweep {sweep}"))?;
    snapshot::save_sweep(&results, data)?;
    for outcome in results
        .jobs
        .iter()
        .filter(|job| snapshot::lists_probe_file(job))
    {
        let path = snapshot::probe_path(data, outcome.job.id);
        let wanted = outcome
            .artifacts
            .iter()
            .find(|artifact| artifact.name == "probe.json")
            .map(|artifact| artifact.sha256.clone())
            .unwrap_or_default();
        let present = std::fs::read(&path)
            .map(|bytes| hex_digest(&bytes) == wanted)
            .unwrap_or(false);
        if !present {
            client
                .download_artifact(outcome.job.id, "probe.json", &path)
                .await
                .with_context(|| {
                    format!("cannot download probe.json of job {}", outcome.job.id.0)
                })?;
        }
    }
    snapshot::load(data)
}

fn hex_digest(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Writes the report of a finished `lorasweep run` into `dir` and prints its summary.
pub fn write_after_run(input: &ReportInput, dir: &Path) -> Result<()> {
    let built = report::build(input);
    let written = report::write(&report::render(&built)?, dir)?;
    print!("{}", report::terminal::summary(&built));
    eprintln!(
        "report: {} files in {} (open {})",
        written.len(),
        dir.display(),
        dir.join("report.html").display()
    );
    Ok(())
}
