//! The boxlite guest agent: PID 1 of every Box.
//!
//! Boot: console descriptors, /proc /sys /dev, the drivers every Box needs (`modules`), then either the probe
//! answer (`boxlite.probe=1` on the kernel command line: print `BOXLITE-PROBE-OK` and power off)
//! or the service: open the `boxlite.agent` virtio-serial port and serve the host (`server`), which
//! assembles the Box on `Setup` (`setup`), runs exec sessions (`session`) and powers off on
//! `Shutdown` (`shutdown`). One reaper thread collects every child (`reaper`).

mod console;
mod dhcp;
mod disk;
mod early;
mod lookup;
mod modules;
mod mounts;
mod netif;
mod port;
mod reaper;
mod server;
mod session;
mod setup;
mod shutdown;
mod spawn;
mod streams;
mod user;

use std::path::Path;
use std::thread;
use std::time::Duration;

use console::log;

/// The marker the probe mode prints on the console.
const PROBE_MARKER: &str = "BOXLITE-PROBE-OK";

fn main() {
    early::ensure_console_fds();
    std::panic::set_hook(Box::new(|info| log!("panic: {info}")));
    if std::process::id() != 1 {
        log!(
            "must run as PID 1 (the init of a Box), not as pid {}",
            std::process::id()
        );
        std::process::exit(2);
    }
    if let Err(e) = early::mount_kernel_filesystems() {
        log!("{e}");
    }
    if early::cmdline_has("boxlite.probe=1") {
        println!("{PROBE_MARKER}");
        let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    }

    // Before any thread exists, so that every thread inherits the mask (see `reaper`).
    if let Err(e) = reaper::block_sigchld() {
        log!("cannot block SIGCHLD: {e}");
    }
    modules::open_catalog(Path::new("/boxlite"));
    for module in modules::BOOT_MODULES {
        modules::ensure(module);
    }
    log!("boot modules loaded");
    let reaper = reaper::start();

    let (reader, sink) = loop {
        match open_agent_port() {
            Ok(pair) => break pair,
            Err(e) => {
                log!("{e}; retrying");
                thread::sleep(Duration::from_secs(1));
            }
        }
    };
    log!(
        "waiting for the host on {}",
        boxlite_protocol::AGENT_PORT_NAME
    );
    server::Server::new(sink, reaper).serve(reader)
}

fn open_agent_port() -> std::io::Result<(port::PortReader, port::FrameSink)> {
    let path = port::find(boxlite_protocol::AGENT_PORT_NAME, Duration::from_secs(10))?;
    let file = port::open(&path)?;
    let writer = file.try_clone()?;
    Ok((port::PortReader::new(file), port::FrameSink::new(writer)))
}
