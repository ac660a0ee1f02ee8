//! Box lifecycle commands: `run`, `create`, `start`, `stop`, `rm`, `ls`, `inspect`, `exec`.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::{bail, Context};
use boxlite::litebox::{ExecError, ExecOptions, ExecSession, ExitStatus, LiteBox};
use boxlite::rootfs::size::parse_size;
use boxlite::runtime::config::{parse_memory, parse_mount, BoxOptions, NetworkKind, PortForward};
use boxlite::runtime::record::{BoxRecord, BoxState};
use boxlite::runtime::{Runtime, RuntimeError};
use boxlite::vmm::accel::{AccelChoice, AccelDecision};
use clap::{Args, Subcommand};

use crate::table::Table;
use crate::terminal::{forward_signals, RawMode};

#[derive(Subcommand, Debug)]
pub enum BoxCommand {
    /// Create a Box from an image and run a command in it.
    Run(RunArgs),
    /// Create a Box without starting it.
    Create(CreateArgs),
    /// Start a stopped Box (its main command runs again, detached).
    Start {
        #[arg(value_name = "BOX")]
        name: String,
    },
    /// Stop a running Box cleanly (hard kill after the timeout).
    Stop {
        #[arg(value_name = "BOX", required = true)]
        names: Vec<String>,
        /// Seconds the Box's processes get to exit after SIGTERM before SIGKILL (as docker
        /// stop -t); the guest then syncs its disks and powers off.
        #[arg(short = 't', long = "time", default_value_t = 10)]
        timeout: u64,
    },
    /// Remove Boxes.
    Rm {
        #[arg(value_name = "BOX", required = true)]
        names: Vec<String>,
        /// Kill a running Box first.
        #[arg(short, long)]
        force: bool,
    },
    /// List Boxes.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show everything about a Box as JSON.
    Inspect {
        #[arg(value_name = "BOX")]
        name: String,
    },
    /// Run a command in a running Box.
    Exec(ExecArgs),
    /// Output of a Box's main process while no terminal was attached to it (`run -d`, or
    /// after a detach), from the Box's main.log.
    Logs {
        #[arg(value_name = "BOX")]
        name: String,
        /// Keep printing what the process writes until the Box stops.
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// Network and resource counters of a running Box.
    Stats {
        #[arg(value_name = "BOX")]
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Grow a stopped Box's disk (thin); its filesystem grows at the next start.
    Resize {
        #[arg(value_name = "BOX")]
        name: String,
        /// New virtual size, e.g. 20G (never smaller than now).
        size: String,
    },
    /// Port forwards of a Box: add and remove them while it runs, list them.
    Port {
        #[command(subcommand)]
        command: PortCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum PortCommand {
    /// Forward [IP:]HOSTPORT:GUESTPORT[/tcp|/udp] to the Box, now if it runs and at every
    /// start (HOSTPORT 0 picks one).
    Add {
        #[arg(value_name = "BOX")]
        name: String,
        forward: String,
    },
    /// Remove a forward, now and for good: [IP:]HOSTPORT:GUESTPORT[/PROTO], or HOSTPORT[/PROTO]
    /// when only one forward uses that host port.
    Rm {
        #[arg(value_name = "BOX")]
        name: String,
        forward: String,
    },
    /// List the forwards in effect.
    Ls {
        #[arg(value_name = "BOX")]
        name: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    #[command(flatten)]
    opts: BoxFlags,
    /// The image (or, with --rootfs, ignored).
    image: String,
    /// The command and its arguments (replaces the image's Cmd).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    opts: BoxFlags,
    /// Run in the background and print the Box id.
    #[arg(short = 'd', long)]
    detach: bool,
    /// Keep stdin open and send it to the command.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Remove the Box when it stops.
    #[arg(long)]
    rm: bool,
    image: String,
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

/// Options shared by `run` and `create`.
#[derive(Args, Debug)]
pub struct BoxFlags {
    #[arg(long)]
    name: Option<String>,
    /// Set an environment variable (KEY=VALUE).
    #[arg(short = 'e', long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Working directory of the command.
    #[arg(short = 'w', long = "workdir")]
    workdir: Option<String>,
    /// User (name, uid, name:group or uid:gid).
    #[arg(short = 'u', long = "user")]
    user: Option<String>,
    /// Allocate a terminal.
    #[arg(short = 't', long = "tty")]
    tty: bool,
    /// Override the image's entrypoint.
    #[arg(long)]
    entrypoint: Option<String>,
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Memory: MiB, or with a unit (k, m, g), e.g. 1g.
    #[arg(long, default_value = "512")]
    memory: String,
    /// Virtual size of the Box's disk (thin), e.g. 10G.
    #[arg(long = "disk-size", default_value = "10G")]
    disk_size: String,
    /// HOST:GUEST[:ro] or VOLUME:GUEST[:ro].
    #[arg(short = 'v', long = "volume")]
    volumes: Vec<String>,
    /// [IP:]HOSTPORT:GUESTPORT[/tcp|/udp].
    #[arg(short = 'p', long = "publish")]
    ports: Vec<String>,
    /// usernet, libslirp, passt or none.
    #[arg(long, default_value = "usernet")]
    network: String,
    /// DNS server for the Box.
    #[arg(long)]
    dns: Vec<String>,
    /// Let the Box reach the host's loopback as host.boxlite.internal.
    #[arg(long = "allow-host")]
    allow_host: bool,
    /// Accelerator: auto, kvm or tcg.
    #[arg(long, env = "BOXLITE_ACCEL", default_value = "auto")]
    accel: String,
    /// Boot from a host directory instead of an image.
    #[arg(long)]
    rootfs: Option<String>,
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    #[arg(short = 'i', long)]
    interactive: bool,
    #[arg(short = 't', long)]
    tty: bool,
    #[arg(short = 'e', long = "env", value_name = "K=V")]
    env: Vec<String>,
    #[arg(short = 'w', long = "workdir")]
    workdir: Option<String>,
    #[arg(short = 'u', long = "user")]
    user: Option<String>,
    #[arg(value_name = "BOX")]
    name: String,
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    command: Vec<String>,
}

pub fn run(cmd: BoxCommand) -> anyhow::Result<u8> {
    let rt = Runtime::from_env()?;
    match cmd {
        BoxCommand::Run(args) => run_box(&rt, args),
        BoxCommand::Create(args) => {
            let opts = box_options(args.opts, args.image, args.command, false)?;
            let bx = rt.create(opts)?;
            outln!("{}", bx.id());
            Ok(0)
        }
        BoxCommand::Start { name } => {
            let mut bx = rt.get(&name)?;
            if bx.record().state == BoxState::Running {
                // As docker: starting a running Box is not an error.
                outln!("{}", bx.name());
                return Ok(0);
            }
            let decision = bx.start(false)?;
            warn_fallback(&decision);
            outln!("{}", bx.name());
            Ok(0)
        }
        BoxCommand::Stop { names, timeout } => {
            for name in names {
                rt.get(&name)?.stop(Duration::from_secs(timeout))?;
                outln!("{name}");
            }
            Ok(0)
        }
        BoxCommand::Rm { names, force } => {
            let mut failed = false;
            for name in names {
                match rt.remove(&name, force) {
                    Ok(()) => outln!("{name}"),
                    Err(e) => {
                        eprintln!("boxlite: {}", crate::error_chain(&e.into()));
                        failed = true;
                    }
                }
            }
            Ok(if failed { 1 } else { 0 })
        }
        BoxCommand::Ls { json } => list(&rt, json),
        BoxCommand::Inspect { name } => {
            let bx = rt.get(&name)?;
            let paths = bx.paths();
            let mut value = serde_json::to_value(bx.record())?;
            value["paths"] = serde_json::json!({
                "dir": paths.dir, "disk": paths.disk(), "console_log": paths.console_log(),
                "control_socket": paths.control_socket(),
            });
            let network = std::fs::read_to_string(paths.network_file()).ok();
            value["network"] = network
                .and_then(|n| serde_json::from_str(&n).ok())
                .unwrap_or(serde_json::Value::Null);
            outln!("{}", serde_json::to_string_pretty(&value)?);
            Ok(0)
        }
        BoxCommand::Exec(args) => exec(&rt, args),
        BoxCommand::Logs { name, follow } => logs(&rt, &name, follow),
        BoxCommand::Stats { name, json } => {
            let stats = rt.get(&name)?.stats()?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                print_stats(&stats);
            }
            Ok(0)
        }
        BoxCommand::Port { command } => port(&rt, command),
        BoxCommand::Resize { name, size } => {
            rt.get(&name)?.grow_disk(parse_size(&size)?)?;
            Ok(0)
        }
    }
}

fn box_options(
    flags: BoxFlags,
    image: String,
    command: Vec<String>,
    rm: bool,
) -> anyhow::Result<BoxOptions> {
    let mut opts = BoxOptions::new(image);
    opts.name = flags.name;
    opts.rootfs_dir = flags.rootfs;
    opts.cmd = command;
    opts.entrypoint = flags
        .entrypoint
        .map(|e| if e.is_empty() { vec![] } else { vec![e] });
    opts.env = flags
        .env
        .into_iter()
        .map(expand_env)
        .collect::<anyhow::Result<_>>()?;
    opts.workdir = flags.workdir;
    opts.user = flags.user;
    opts.tty = flags.tty;
    opts.cpus = flags.cpus;
    opts.memory_mib = parse_memory(&flags.memory).map_err(anyhow::Error::msg)?;
    opts.disk_size = parse_size(&flags.disk_size)?;
    opts.mounts = flags
        .volumes
        .iter()
        .map(|v| parse_mount(v))
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::msg)?;
    opts.ports = flags
        .ports
        .iter()
        .map(|p| p.parse::<PortForward>())
        .collect::<Result<_, _>>()?;
    opts.network = flags.network.parse::<NetworkKind>()?;
    for dns in &flags.dns {
        dns.parse::<std::net::IpAddr>()
            .with_context(|| format!("invalid --dns {dns:?}"))?;
    }
    opts.dns = flags.dns;
    opts.allow_host = flags.allow_host;
    opts.auto_remove = rm;
    opts.accel = flags
        .accel
        .parse::<AccelChoice>()
        .map_err(anyhow::Error::msg)?;
    Ok(opts)
}

/// `-e KEY` takes the value from the caller's environment, as docker does.
fn expand_env(kv: String) -> anyhow::Result<String> {
    if kv.contains('=') {
        return Ok(kv);
    }
    if kv.is_empty() {
        bail!("invalid -e \"\": expected KEY=VALUE");
    }
    Ok(match std::env::var(&kv) {
        Ok(v) => format!("{kv}={v}"),
        Err(_) => kv,
    })
}

fn warn_fallback(decision: &AccelDecision) {
    if let Some(reason) = &decision.fallback_reason {
        eprintln!("boxlite: warning: KVM unusable ({reason}); using QEMU TCG software emulation (slower). Use --accel tcg to silence this.");
    }
}

fn run_box(rt: &Runtime, args: RunArgs) -> anyhow::Result<u8> {
    let interactive = args.interactive;
    let tty = args.opts.tty;
    let opts = box_options(args.opts, args.image, args.command, args.rm)?;
    let mut bx = rt.create(opts)?;
    if args.detach {
        let started = bx.start(false);
        if let Err(e) = started {
            return Err(cleanup_failed(bx, args.rm, e));
        }
        warn_fallback(started.as_ref().unwrap());
        outln!("{}", bx.id());
        return Ok(0);
    }
    match bx.start(true) {
        Ok(decision) => warn_fallback(&decision),
        Err(e) => return Err(cleanup_failed(bx, args.rm, e)),
    }
    let (rows, cols) = terminal_size();
    let session = bx.attach(interactive, rows, cols)?;
    let status = drive_session(session, interactive, tty);
    // The Box stops when its main process ends; wait so that `run --rm` leaves nothing behind.
    let _ = bx.wait_stopped();
    finish(status)
}

fn cleanup_failed(bx: LiteBox, rm: bool, e: RuntimeError) -> anyhow::Error {
    if rm {
        let _ = bx.remove(true);
    }
    e.into()
}

fn exec(rt: &Runtime, args: ExecArgs) -> anyhow::Result<u8> {
    let mut bx = rt.get(&args.name)?;
    let (rows, cols) = terminal_size();
    let opts = ExecOptions {
        argv: args.command,
        env: args
            .env
            .into_iter()
            .map(expand_env)
            .collect::<anyhow::Result<_>>()?,
        cwd: args.workdir,
        user: args.user,
        tty: args.tty,
        stdin: args.interactive,
        rows,
        cols,
    };
    let session = bx.exec(opts)?;
    finish(drive_session(session, args.interactive, args.tty))
}

/// Connects the session to this process's stdio, terminal and signals until it exits.
fn drive_session(session: ExecSession, stdin: bool, tty: bool) -> Result<ExitStatus, ExecError> {
    let control = session.control();
    let _raw = (tty && std::io::stdin().is_terminal())
        .then(RawMode::enter)
        .flatten();
    let _signals = forward_signals(control.clone(), tty);
    if stdin {
        let c = control.clone();
        std::thread::spawn(move || {
            let _ = c.pump_stdin(std::io::stdin());
        });
    }
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr();
    let status = session.wait(&mut out, &mut err);
    let _ = out.flush();
    status
}

fn finish(status: Result<ExitStatus, ExecError>) -> anyhow::Result<u8> {
    match status {
        Ok(status) => Ok(status.code().clamp(0, 255) as u8),
        Err(ExecError::Failed { message, exit_code }) => {
            eprintln!("boxlite: {message}");
            Ok(exit_code as u8)
        }
        Err(e) => Err(e.into()),
    }
}

fn terminal_size() -> (u16, u16) {
    crate::terminal::size().unwrap_or((24, 80))
}

/// Copies the Box's main.log to stdout; with `follow`, keeps copying until the Box is no longer
/// running and everything it wrote is out.
fn logs(rt: &Runtime, name: &str, follow: bool) -> anyhow::Result<u8> {
    use std::io::Read;
    let path = rt.get(name)?.paths().main_log();
    let mut file = match std::fs::File::open(&path) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Read the state first: a Box seen stopped has written all it will before the last read.
        let running = follow
            && matches!(
                rt.get(name)?.record().state,
                BoxState::Running | BoxState::Starting
            );
        if file.is_none() {
            file = std::fs::File::open(&path).ok();
        }
        if let Some(f) = file.as_mut() {
            loop {
                let n = f
                    .read(&mut buf)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                if n == 0 {
                    break;
                }
                crate::output::write_bytes(&buf[..n]);
            }
        }
        if !running {
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn list(rt: &Runtime, json: bool) -> anyhow::Result<u8> {
    let boxes = rt.list()?;
    if json {
        let rows: Vec<serde_json::Value> = boxes.iter().map(ls_json).collect();
        outln!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(0);
    }
    let mut table = Table::new(&["ID", "NAME", "IMAGE", "STATE", "STATUS"]);
    for b in &boxes {
        let status = match (&b.exit_reason, b.state.to_string().as_str()) {
            (Some(reason), "exited") => reason.clone(),
            _ => String::new(),
        };
        table.row([
            b.id[..12].to_string(),
            b.name.clone(),
            b.image.clone(),
            b.state.to_string(),
            status,
        ]);
    }
    table.print();
    Ok(0)
}

fn ls_json(b: &BoxRecord) -> serde_json::Value {
    serde_json::json!({
        "id": b.id, "name": b.name, "image": b.image, "state": b.state,
        "exit_code": b.exit_code, "exit_reason": b.exit_reason,
        "created_at": b.created_at, "started_at": b.started_at, "finished_at": b.finished_at,
        "shim_pid": b.shim_pid, "vmm_pid": b.vmm_pid,
    })
}

fn port(rt: &Runtime, command: PortCommand) -> anyhow::Result<u8> {
    match command {
        PortCommand::Add { name, forward } => {
            let spec: PortForward = forward.parse()?;
            let added = rt.get(&name)?.port_add(&spec)?;
            outln!("{}", added);
        }
        PortCommand::Rm { name, forward } => {
            let mut bx = rt.get(&name)?;
            let spec = bx.resolve_forward(&forward)?;
            bx.port_remove(&spec)?;
        }
        PortCommand::Ls { name, json } => {
            let ports = rt.get(&name)?.ports()?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&ports)?);
            } else {
                for p in ports {
                    outln!("{p}");
                }
            }
        }
    }
    Ok(0)
}

fn print_stats(stats: &serde_json::Value) {
    let net = &stats["network"];
    if net.is_object() {
        outln!("network:");
        if let Some(map) = net.as_object() {
            for (k, v) in map {
                outln!("  {k:<24} {}", stat_cell(v));
            }
        }
    } else {
        outln!("network: none");
    }
    outln!("resources:");
    if let Some(map) = stats["resources"].as_object() {
        for (k, v) in map {
            outln!("  {k:<24} {}", stat_cell(v));
        }
    }
}

/// One value of the stats table; a counter the backend cannot know (null) shows as `-`.
fn stat_cell(value: &serde_json::Value) -> String {
    if value.is_null() {
        "-".into()
    } else {
        value.to_string()
    }
}
