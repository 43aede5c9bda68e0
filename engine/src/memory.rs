//! Peak resident memory (RSS) of this process over a window of time: a job, a probe batch, a
//! benchmark's steps.
//!
//! Linux keeps one high-water mark of the process's resident set, `VmHWM` in
//! `/proc/self/status`, and writing `5` to `/proc/self/clear_refs` resets it to the current
//! resident set. One reset per window would spoil the other windows open at the same time (a
//! worker runs several jobs in one process), so every reset goes through a registry here: before
//! it resets the mark, it folds the mark's value into every open window's running peak. A
//! window's peak is then exactly the highest resident set the process had while it was open
//! (the memory of whatever else the process ran meanwhile included: RSS is per process).
//!
//! Elsewhere than Linux, or where the mark cannot be reset, a window has no reading (`None`)
//! rather than a lifetime peak that would be attributed to the wrong window.

use std::sync::Mutex;

/// Open windows: `(id, highest mark seen before a reset since the window opened)`.
static OPEN: Mutex<Vec<(u64, u64)>> = Mutex::new(Vec::new());
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

const GIB: f64 = (1u64 << 30) as f64;

/// A window over which the process's peak resident memory is measured; it closes when dropped.
#[derive(Debug)]
pub struct PeakRss {
    /// `None` when the high-water mark could not be reset (no window is measured).
    id: Option<u64>,
}

impl PeakRss {
    /// Opens a window starting now.
    pub fn start() -> Self {
        let mut open = OPEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let id = reset_mark(&mut open).then(|| {
            let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            open.push((id, 0));
            id
        });
        Self { id }
    }

    /// The highest resident set of the process since the window opened, in bytes; `None` where
    /// it cannot be measured.
    pub fn peak_bytes(&self) -> Option<u64> {
        let id = self.id?;
        let open = OPEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let folded = open.iter().find(|(open_id, _)| *open_id == id)?.1;
        Some(folded.max(high_water_mark()?))
    }

    /// [`peak_bytes`](Self::peak_bytes) in GiB.
    pub fn peak_gib(&self) -> Option<f64> {
        self.peak_bytes().map(gib)
    }

    /// Closes the window and opens a new one starting now (for one reading per batch);
    /// returns the closed window's peak in bytes.
    pub fn restart(&mut self) -> Option<u64> {
        let peak = self.peak_bytes();
        *self = Self::start();
        peak
    }
}

impl Drop for PeakRss {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            let mut open = OPEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            open.retain(|(open_id, _)| *open_id != id);
        }
    }
}

/// Bytes in GiB.
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / GIB
}

/// Folds the current mark into every open window, then resets it; whether the reset worked.
fn reset_mark(open: &mut [(u64, u64)]) -> bool {
    let Some(mark) = high_water_mark() else {
        return false;
    };
    for (_, peak) in open.iter_mut() {
        *peak = (*peak).max(mark);
    }
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The process's resident set now, in bytes (`VmRSS`).
pub fn current_rss_bytes() -> Option<u64> {
    status_kib("VmRSS:").map(|kib| kib * 1024)
}

/// The process's resident high-water mark since the last reset, in bytes (`VmHWM`).
fn high_water_mark() -> Option<u64> {
    status_kib("VmHWM:").map(|kib| kib * 1024)
}

/// A `kB` line of `/proc/self/status`.
fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    line[field.len()..]
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// Touches `bytes` of fresh memory (so that it is resident), then frees it.
    fn touch_and_free(bytes: usize) {
        let block = vec![1u8; bytes];
        std::hint::black_box(&block);
    }

    /// A window keeps the peak it saw after another window reset the process's mark, and
    /// `restart` returns it. Other tests run in this process too, so only lower bounds,
    /// which their allocations cannot break, are checked.
    #[test]
    fn a_window_keeps_its_peak_across_another_windows_reset() {
        const BLOCK: u64 = 256 << 20;
        let before = current_rss_bytes().expect("VmRSS on Linux");
        let mut outer = PeakRss::start();
        touch_and_free(BLOCK as usize);
        let inner = PeakRss::start();
        assert!(inner.peak_bytes().is_some());
        let seen = outer.restart().expect("a reading");
        assert!(
            seen >= before + BLOCK * 9 / 10,
            "the window lost the block: peak {seen}, {before} before a {BLOCK}-byte block"
        );
    }
}
