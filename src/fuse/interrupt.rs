//! Ctrl-C or SIGTERM during `warm fuse`: by default the process dies at once and leaves the
//! writer's hidden `.partial` files (up to a model's size) in the output folder. With
//! [`stop_on_signals`] the pass stops at the next tensor or part instead, the writer removes
//! what it wrote, and the command exits 130. A second signal ends the process at once.
//! `warm serve` does not call it: its runtime handles the signals (drain, then exit).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use super::FuseError;

static STOP: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// Makes SIGINT and SIGTERM stop the fusion pass (see the module note).
pub fn stop_on_signals() -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    use signal_hook::flag;
    let stop = STOP.get_or_init(|| Arc::new(AtomicBool::new(false)));
    for signal in [SIGINT, SIGTERM] {
        // Registered first, so it sees the flag before the second handler sets it: the
        // first signal only sets the flag, the second exits.
        flag::register_conditional_shutdown(signal, 130, Arc::clone(stop))?;
        flag::register(signal, Arc::clone(stop))?;
    }
    Ok(())
}

/// An error once a stop was asked for.
pub(crate) fn check() -> Result<(), FuseError> {
    match STOP.get() {
        Some(stop) if stop.load(Ordering::Relaxed) => Err(FuseError::Interrupted),
        _ => Ok(()),
    }
}
