//! Command output on stdout. A reader that goes away early (`boxlite ls | head -1`) ends the
//! command quietly with status 141, as SIGPIPE ends a shell tool, instead of the panic that
//! `println!` gives. Writes to the Box's sockets keep their own error handling: SIGPIPE stays
//! ignored in this process.

use std::io::{self, Write};

/// Exit status of a command whose output reader went away (128 + SIGPIPE).
const BROKEN_PIPE_STATUS: i32 = 141;

/// Writes `args` to stdout (`outln!`, `out!`).
pub fn write(args: std::fmt::Arguments<'_>) {
    let mut stdout = io::stdout().lock();
    finish(stdout.write_fmt(args).and_then(|()| stdout.flush()));
}

/// Writes raw bytes to stdout (a log's content).
pub fn write_bytes(bytes: &[u8]) {
    let mut stdout = io::stdout().lock();
    finish(stdout.write_all(bytes).and_then(|()| stdout.flush()));
}

fn finish(result: io::Result<()>) {
    if let Err(e) = result {
        if e.kind() == io::ErrorKind::BrokenPipe {
            std::process::exit(BROKEN_PIPE_STATUS);
        }
        eprintln!("boxlite: cannot write to stdout: {e}");
        std::process::exit(125);
    }
}

/// `println!` for command output, see the module documentation.
macro_rules! outln {
    () => { $crate::output::write(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::output::write(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `print!` for command output, see the module documentation.
macro_rules! out {
    ($($arg:tt)*) => { $crate::output::write(format_args!($($arg)*)) };
}
