//! Embedding boxlite: create a Box from an image, run a command in it, stream its output, remove
//! the Box. Usage: `cargo run --example run -- IMAGE CMD [ARG...]` (with `BOXLITE_HOME` set or
//! `~/.boxlite`, and the image already pulled or imported).

use std::time::Duration;

use boxlite::litebox::ExecOptions;
use boxlite::runtime::{config::BoxOptions, Runtime};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let image = args.next().ok_or("usage: run IMAGE CMD [ARG...]")?;
    let argv: Vec<String> = args.collect();
    if argv.is_empty() {
        return Err("usage: run IMAGE CMD [ARG...]".into());
    }

    let runtime = Runtime::from_env()?;
    let mut opts = BoxOptions::new(image);
    opts.idle = true;
    let mut bx = runtime.create(opts)?;
    let accel = bx.start(false)?;
    eprintln!("box {} running under {}", bx.name(), accel.accel);

    let session = bx.exec(ExecOptions {
        argv,
        ..Default::default()
    })?;
    let status = session.wait(&mut std::io::stdout(), &mut std::io::stderr())?;

    bx.stop(Duration::from_secs(10))?;
    bx.remove(false)?;
    std::process::exit(status.code());
}
