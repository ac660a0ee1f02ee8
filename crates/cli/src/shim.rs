//! `boxlite-shim`: the per-Box process that owns a running Box (see `boxlite::shim`). Started by
//! the library with its readiness pipe as fd 3; not meant to be run by hand.

use std::path::PathBuf;

use boxlite::shim::{run, ShimArgs};
use boxlite::vmm::accel::Accel;

fn main() {
    let mut home = None;
    let mut box_id = None;
    let mut accel = Accel::Tcg;
    let mut attach = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--home" => home = args.next().map(PathBuf::from),
            "--box" => box_id = args.next(),
            "--accel" => {
                accel = match args.next().as_deref() {
                    Some("kvm") => Accel::Kvm,
                    _ => Accel::Tcg,
                }
            }
            "--attach" => attach = true,
            other => {
                eprintln!("boxlite-shim: unexpected argument {other:?}");
                std::process::exit(2);
            }
        }
    }
    let (Some(home), Some(box_id)) = (home, box_id) else {
        eprintln!("usage: boxlite-shim --home DIR --box ID [--accel kvm|tcg] [--attach]");
        std::process::exit(2);
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BOXLITE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    // fd 3 is the readiness pipe when the library started us.
    // SAFETY: fcntl(F_GETFD) only queries whether the descriptor is open.
    let ready_fd = (unsafe { libc::fcntl(3, libc::F_GETFD) } >= 0).then_some(3);
    std::process::exit(run(ShimArgs {
        home,
        box_id,
        accel,
        attach,
        ready_fd,
    }));
}
