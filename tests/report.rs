//! `lorasweep report` through the real binary, on stored results saved as a snapshot
//! (`tests/fixtures/report/basic`, made by `make_basic.py` there): golden Markdown and CSV
//! (`UPDATE_GOLDEN=1` rewrites them), the JSON tables, determinism, failed and pending
//! cells, bad input named by file, and the HTML page in headless Chromium.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/report")
}

fn basic() -> PathBuf {
    fixture_dir().join("basic")
}

fn lorasweep(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lorasweep"))
        .args(args)
        .env_remove("LORASWEEP_COORDINATOR")
        .output()
        .expect("the lorasweep binary runs")
}

fn report_from(from: &Path, out: &Path) -> Output {
    lorasweep(&[
        "report",
        "--from",
        from.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
}

fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "lorasweep failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
}

/// Compares a produced file with its golden copy; `UPDATE_GOLDEN=1` rewrites the copy.
fn check_golden(produced: &Path, golden_name: &str) {
    let golden = fixture_dir().join("golden").join(golden_name);
    let text = std::fs::read_to_string(produced).unwrap();
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(golden.parent().unwrap()).unwrap();
        std::fs::write(&golden, &text).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&golden).unwrap_or_else(|error| {
        panic!(
            "cannot read {} ({error}); run with UPDATE_GOLDEN=1 to create it",
            golden.display()
        )
    });
    if text != expected {
        let first_difference = text
            .lines()
            .zip(expected.lines())
            .position(|(got, want)| got != want)
            .unwrap_or(text.lines().count().min(expected.lines().count()));
        panic!(
            "{} differs from {} at line {}:\n  got:  {:?}\n  want: {:?}\n(UPDATE_GOLDEN=1 rewrites the golden file after a deliberate change)",
            produced.display(),
            golden.display(),
            first_difference + 1,
            text.lines().nth(first_difference),
            expected.lines().nth(first_difference)
        );
    }
}

#[test]
fn markdown_and_csv_match_the_golden_files() {
    let out = tempfile::tempdir().unwrap();
    let output = report_from(&basic(), out.path());
    assert_success(&output);
    for file in [
        "report.md",
        "report.html",
        "results.csv",
        "results.json",
        "page_smollm2-135m_math.svg",
        "page_smollm2-135m_chat.svg",
        "score_smollm2-135m_math.svg",
        "score_smollm2-135m_chat.svg",
    ] {
        assert!(out.path().join(file).is_file(), "{file} was not written");
    }
    check_golden(&out.path().join("report.md"), "report.md");
    check_golden(&out.path().join("results.csv"), "results.csv");
    // The terminal summary: aligned, with the partial counts.
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        stdout.contains("partial: 1 pending, 2 failed/skipped/cancelled"),
        "{stdout}"
    );
    assert!(stdout.contains("dominant / dora"), "{stdout}");
    let widths: Vec<usize> = stdout
        .lines()
        .filter(|line| line.starts_with('│') || line.starts_with('┌'))
        .map(|line| line.chars().count())
        .collect();
    assert!(widths.len() > 5 && widths.iter().all(|width| *width == widths[0]));
}

#[test]
fn results_json_has_one_row_per_job_with_every_parameter() {
    let out = tempfile::tempdir().unwrap();
    assert_success(&report_from(&basic(), out.path()));
    let rows: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("results.json")).unwrap())
            .unwrap();
    assert_eq!(rows.len(), 38);
    let failed: Vec<&Value> = rows.iter().filter(|row| row["state"] == "failed").collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["attempts"], 2);
    assert_eq!(failed[0]["train.placement"], "dominant");
    assert!(failed[0]["score"].is_null());
    // An eval row carries its train job's settings and its own.
    let eval = rows
        .iter()
        .find(|row| {
            row["kind"] == "eval"
                && row["task"] == "chat"
                && row["train.variant"] == "dora"
                && row["train.seed"] == 0
                && row["train.placement"] == "all"
        })
        .expect("the chat eval of all/dora seed 0");
    assert_eq!(eval["score"], 1.6158);
    assert_eq!(eval["eval.limit"], 12);
    assert!(eval["metrics.perplexity"].as_f64().unwrap() > 5.0);
    let probe = rows.iter().find(|row| row["kind"] == "probe").unwrap();
    assert_eq!(probe["probe.rank"], 8);
    assert!(probe["share_by_kind.down_proj"].as_f64().unwrap() > 0.0);
}

#[test]
fn json_format_prints_the_aggregated_tables() {
    let from = basic();
    let output = lorasweep(&[
        "report",
        "--from",
        from.to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert_success(&output);
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["sweep"]["partial"], true);
    assert_eq!(report["sweep"]["pending"], 1);
    assert_eq!(report["sweep"]["unsuccessful"], 2);
    assert_eq!(report["baseline"], "placement=all variant=lora");
    let groups = report["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 2);
    let math = &groups[0];
    assert_eq!(math["task"], "math");
    assert_eq!(math["higher_is_better"], true);
    let chat = &groups[1];
    assert_eq!(chat["metric"], "loss");
    assert_eq!(chat["higher_is_better"], false);
    let row = |group: &Value, label: &str| -> Value {
        group["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|row| row["label"] == label)
            .cloned()
            .unwrap_or_else(|| panic!("no row {label}"))
    };
    assert_eq!(row(math, "all / lora")["is_baseline"], true);
    let failed = row(math, "dominant / dora");
    assert_eq!(failed["score"]["n"], 1);
    assert_eq!(failed["score"]["failed"], 1);
    let pending = row(chat, "dominant / dora");
    assert_eq!(pending["score"]["pending"], 1);
    // Two seeds are too few to tell, however consistent the difference: no label.
    let worse = row(chat, "dominant / lora");
    assert_eq!(worse["versus_baseline"]["pairs"], 2);
    assert_eq!(worse["versus_baseline"]["significant"], false);
    assert!(worse["versus_baseline"]["better"].is_null());
    assert!(worse["versus_baseline"]["mean"].as_f64().unwrap() > 0.0);
    // Both seeds worse: 2 of the 4 sign assignments reach it; Holm over the table's 3 rows.
    assert_eq!(worse["versus_baseline"]["p"], 0.5);
    assert_eq!(worse["versus_baseline"]["p_holm"], 1.0);
    let dora = row(chat, "all / dora");
    assert_eq!(dora["versus_baseline"]["significant"], false);
    // Vanilla LoRA on every module of SmolLM2-135M at rank 8.
    assert_eq!(row(math, "all / lora")["trainable_parameters"], 2_442_240);
    let summary = &report["summaries"][0];
    assert_eq!(summary["same_metric"], false);
    let best = summary["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["label"] == "all / lora")
        .unwrap();
    assert_eq!(best["average_rank"], 1.0);
    let page = &report["page"][0];
    assert_eq!(page["tasks"][0]["seeds"], serde_json::json!([0, 1]));
    assert_eq!(page["tasks"][0]["layers"], 30);
    let tau = page["kendall"][0]["tau"].as_f64().unwrap();
    assert!(tau > 0.5 && tau <= 1.0, "{tau}");
    assert_eq!(page["kendall"][0]["modules"], 210);
}

#[test]
fn the_report_is_the_same_every_time() {
    let first = tempfile::tempdir().unwrap();
    let second = tempfile::tempdir().unwrap();
    assert_success(&report_from(&basic(), first.path()));
    assert_success(&report_from(&basic(), second.path()));
    let mut names: Vec<String> = std::fs::read_dir(first.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(names.len(), 8);
    for name in names {
        assert_eq!(
            std::fs::read(first.path().join(&name)).unwrap(),
            std::fs::read(second.path().join(&name)).unwrap(),
            "{name} differs between two runs"
        );
    }
}

/// A copy of the basic fixture whose `sweep.json` is changed by `edit`.
fn edited_fixture(edit: impl FnOnce(&mut Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut sweep: Value =
        serde_json::from_str(&std::fs::read_to_string(basic().join("sweep.json")).unwrap())
            .unwrap();
    edit(&mut sweep);
    std::fs::write(
        dir.path().join("sweep.json"),
        serde_json::to_string(&sweep).unwrap(),
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("probes")).unwrap();
    for entry in std::fs::read_dir(basic().join("probes")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(
            entry.path(),
            dir.path().join("probes").join(entry.file_name()),
        )
        .unwrap();
    }
    dir
}

#[test]
fn a_configuration_with_every_seed_failed_says_failed_not_zero() {
    let input = edited_fixture(|sweep| {
        for job in sweep["jobs"].as_array_mut().unwrap() {
            let params = &job["params"];
            if job["kind"] == "train"
                && job["task"] == "math"
                && params["placement"] == "dominant"
                && params["variant"] == "dora"
            {
                job["state"] = "failed".into();
                job["result"] = Value::Null;
                job["last_error"] = "out of memory".into();
            }
        }
    });
    let out = tempfile::tempdir().unwrap();
    assert_success(&report_from(input.path(), out.path()));
    let markdown = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    let row = markdown
        .lines()
        .find(|line| line.starts_with("| dominant | dora |"))
        .unwrap();
    assert!(
        row.contains("| failed | 0/2 (2 failed) |"),
        "the failed row reads {row}"
    );
    assert!(!row.contains("0.0000"), "{row}");
    assert!(markdown.contains("dominant / dora seed 0: train failed: out of memory"));
}

#[test]
fn a_corrupt_probe_file_is_an_error_naming_it() {
    let input = edited_fixture(|_| {});
    let probe = input.path().join("probes/job-2.json");
    let text = std::fs::read_to_string(&probe).unwrap();
    std::fs::write(&probe, &text[..text.len() / 2]).unwrap();
    let out = tempfile::tempdir().unwrap();
    let output = report_from(input.path(), out.path());
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("job-2.json:1:") && stderr.contains("not a probe result"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_missing_probe_file_is_an_error_naming_it() {
    let input = edited_fixture(|_| {});
    std::fs::remove_file(input.path().join("probes/job-3.json")).unwrap();
    let output = report_from(input.path(), tempfile::tempdir().unwrap().path());
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("job-3.json") && stderr.contains("missing"),
        "{stderr}"
    );
}

#[test]
fn a_bad_job_in_the_stored_sweep_is_an_error_naming_the_field() {
    let input = edited_fixture(|sweep| {
        sweep["jobs"][5]["state"] = "exploded".into();
    });
    let output = report_from(input.path(), tempfile::tempdir().unwrap().path());
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("sweep.json: jobs[5]")
            && stderr.contains("field state")
            && stderr.contains("exploded"),
        "{stderr}"
    );
    std::fs::write(input.path().join("sweep.json"), "{\"sweep\": [1,\n").unwrap();
    let output = report_from(input.path(), tempfile::tempdir().unwrap().path());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("sweep.json:2:"),
        "{stderr}"
    );
}

#[test]
fn without_sweep_or_from_the_command_explains_itself() {
    let output = lorasweep(&["report", "--out", "/nonexistent-report-dir"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("SWEEP") || stderr.contains("--from"),
        "{stderr}"
    );
}

// ---- the HTML page in a real browser --------------------------------------------------

/// Headless Chromium from the system's packages, if installed.
fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join(name))
                    .find(|path| path.is_file())
            })
        })
}

/// Runs headless Chromium on a page with console messages logged to stderr (both outputs
/// go to files, so a chatty browser never blocks on a full pipe); kills it after 90 s.
fn run_chromium(browser: &Path, page: &Path, extra: &[String]) -> Output {
    let scratch = tempfile::tempdir().unwrap();
    let stdout_path = scratch.path().join("stdout");
    let stderr_path = scratch.path().join("stderr");
    let mut child = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1280,2400",
        ])
        .arg(format!(
            "--user-data-dir={}",
            scratch.path().join("profile").display()
        ))
        .args(extra)
        .arg(format!("file://{}", page.display()))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .expect("chromium starts");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium did not finish within 90 s: {}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Output {
        status,
        stdout: std::fs::read(&stdout_path).unwrap(),
        stderr: std::fs::read(&stderr_path).unwrap(),
    }
}

/// Console errors and failed loads Chromium logged for the page.
fn console_errors(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter(|line| {
            line.contains("CONSOLE")
                || line.contains("Uncaught")
                || line.contains("net::ERR_")
                || line.contains("Failed to load")
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn the_html_page_opens_in_headless_chromium_with_the_heatmap_and_no_console_errors() {
    let Some(browser) = chromium() else {
        if std::env::var_os("CI").is_some() {
            panic!("chromium is not installed, and CI is set: the browser test must run in CI");
        }
        eprintln!("skipped: chromium is not installed (apt-get install chromium)");
        return;
    };
    let out = tempfile::tempdir().unwrap();
    assert_success(&report_from(&basic(), out.path()));
    let page = out.path().join("report.html");
    let html = std::fs::read_to_string(&page).unwrap();
    for reference in ["<script", "<link", " src=", "url("] {
        assert!(
            !html.contains(reference),
            "the page is not self-contained: it has {reference}"
        );
    }

    // The check can fail: a page that logs an error is caught.
    let control = out.path().join("control.html");
    std::fs::write(
        &control,
        "<!DOCTYPE html><html><body><script>console.error('control error')</script></body></html>",
    )
    .unwrap();
    let control_run = run_chromium(&browser, &control, &["--dump-dom".to_string()]);
    assert!(
        !console_errors(&String::from_utf8_lossy(&control_run.stderr)).is_empty(),
        "the control page's console error was not seen: {}",
        String::from_utf8_lossy(&control_run.stderr)
    );

    let dump = run_chromium(&browser, &page, &["--dump-dom".to_string()]);
    assert!(dump.status.success());
    let stderr = String::from_utf8_lossy(&dump.stderr);
    let errors = console_errors(&stderr);
    assert!(errors.is_empty(), "console errors: {errors:?}");
    let dom = String::from_utf8_lossy(&dump.stdout);
    let heatmap = dom
        .find("<figure id=\"page_smollm2-135m_math\">")
        .expect("the math heatmap figure is in the DOM");
    let figure = &dom[heatmap..];
    let figure = &figure[..figure.find("</figure>").unwrap()];
    assert!(figure.contains("<svg"), "the heatmap figure has no svg");
    // 30 layers × 7 kinds of cells, the colour bar and the dominant module's outline.
    assert!(
        figure.matches("<rect").count() > 210,
        "too few heatmap cells"
    );
    assert!(figure.contains("module kind") && figure.contains("layer"));
    assert!(dom.contains("<figure id=\"score_smollm2-135m_chat\">"));

    let screenshot = out.path().join("report.png");
    let shot = run_chromium(
        &browser,
        &page,
        &[format!("--screenshot={}", screenshot.display())],
    );
    assert!(shot.status.success());
    let size = std::fs::metadata(&screenshot)
        .map(|meta| meta.len())
        .unwrap_or(0);
    // A blank 1280×2400 page compresses to a few kilobytes; tables and plots do not.
    assert!(
        size > 60_000,
        "the screenshot is nearly empty ({size} bytes)"
    );
}

// ---- against a live coordinator --------------------------------------------------------

/// A coordinator of this binary on a free loopback port; stopped when dropped.
struct Coordinator {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Coordinator {
    fn start() -> Coordinator {
        let dir = tempfile::tempdir().unwrap();
        let address_file = dir.path().join("addr");
        let child = Command::new(env!("CARGO_BIN_EXE_lorasweep"))
            .arg("coordinator")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--db")
            .arg(dir.path().join("state.db"))
            .arg("--addr-file")
            .arg(&address_file)
            .arg("--exit-on-stdin-eof")
            .env_remove("LORASWEEP_TOKEN")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        let address = loop {
            if let Ok(text) = std::fs::read_to_string(&address_file) {
                break text.trim().to_string();
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the coordinator did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        Coordinator {
            child,
            url: format!("http://{address}"),
            _dir: dir,
        }
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_sweep_no_worker_has_started_reports_every_cell_pending() {
    let coordinator = Coordinator::start();
    let spec = basic().join("spec.yaml");
    let submitted = lorasweep(&[
        "submit",
        spec.to_str().unwrap(),
        "--coordinator",
        &coordinator.url,
    ]);
    assert_success(&submitted);
    let sweep = String::from_utf8(submitted.stdout)
        .unwrap()
        .trim()
        .to_string();
    let out = tempfile::tempdir().unwrap();
    let output = lorasweep(&[
        "report",
        &sweep,
        "--coordinator",
        &coordinator.url,
        "--out",
        out.path().to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert_success(&output);
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["sweep"]["pending"], 38);
    assert_eq!(report["sweep"]["partial"], true);
    for group in report["groups"].as_array().unwrap() {
        assert_eq!(group["base"]["pending"], 1);
        for row in group["rows"].as_array().unwrap() {
            assert_eq!(row["score"]["n"], 0);
            assert_eq!(row["score"]["pending"], 2);
            assert!(row["score"]["mean"].is_null());
        }
    }
    // The snapshot it was made from is kept beside it, and makes the same report offline.
    assert!(out.path().join("data/sweep.json").is_file());
    let again = tempfile::tempdir().unwrap();
    assert_success(&report_from(&out.path().join("data"), again.path()));
    assert_eq!(
        std::fs::read_to_string(out.path().join("report.md")).unwrap(),
        std::fs::read_to_string(again.path().join("report.md")).unwrap()
    );
    let markdown = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    assert!(markdown.contains("| all | lora | – | – | pending | 0/2 (2 pending) |"));
}
