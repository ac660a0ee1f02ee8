//! Progress and error lines on the VM's console.
//!
//! The kernel hands PID 1 `/dev/console` (the serial port the host records in `console.log`) as
//! stdin, stdout and stderr. Every line the agent writes there starts with `boxlite-guest:` so it
//! stands out among kernel messages. Those three descriptors stay open for the agent's whole life,
//! which also guarantees that every descriptor the agent opens later is above 2.

use std::io::Write;

/// Writes one line to the console, prefixed `boxlite-guest:` and the seconds since boot (the
/// kernel's clock, so lines line up with kernel messages).
pub fn line(args: std::fmt::Arguments<'_>) {
    let since_boot = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
        .unwrap_or(0.0);
    let text = format!("boxlite-guest: [{since_boot:.3}] {args}\n");
    // One write per line keeps lines from different threads whole; a console that cannot be
    // written to has nowhere better to report it.
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// `log!("format", args…)`: one console line.
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::console::line(format_args!($($arg)*))
    };
}
pub(crate) use log;
