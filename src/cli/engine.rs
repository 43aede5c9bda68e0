//! `generate`, `probe`, `train`: one engine job, locally.
use clap::Args;

/// Arguments of `lorasweep generate`.
#[derive(Args)]
pub struct GenerateArgs {}
/// Arguments of `lorasweep probe`.
#[derive(Args)]
pub struct ProbeArgs {}
/// Arguments of `lorasweep train`.
#[derive(Args)]
pub struct TrainArgs {}

pub fn generate(_args: GenerateArgs) -> anyhow::Result<()> {
    anyhow::bail!("generate: under construction")
}
pub fn probe(_args: ProbeArgs) -> anyhow::Result<()> {
    anyhow::bail!("probe: under construction")
}
pub fn train(_args: TrainArgs) -> anyhow::Result<()> {
    anyhow::bail!("train: under construction")
}
