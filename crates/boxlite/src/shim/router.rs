//! Routes frames between CLI connections and the agent.
//!
//! Every exec session has a channel number on each link: the CLI picks its own, the router picks a
//! fresh global one for the agent link and remembers the pair. The Box's main process always runs
//! on [`MAIN_CHANNEL`]; its output goes to the attached CLI, or to `main.log` when none is
//! attached. When the main process ends, the router asks the agent to power the guest off.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use boxlite_protocol::{read_frame, write_frame, Control, ExecRequest, Frame, Tag, BOX_CHANNEL};
use tracing::{debug, info, warn};

use crate::net::PortForward;
use crate::runtime::config::ProcessSpec;
use crate::runtime::paths::BoxPaths;
use crate::runtime::record::BoxRecord;

/// The agent channel of the Box's main process.
pub const MAIN_CHANNEL: u32 = 1;
/// How long an attaching `run` may take to connect before the main process starts unattached.
const ATTACH_GRACE: Duration = Duration::from_secs(30);

type Conn = Arc<Mutex<UnixStream>>;

/// Where the agent's frames for one channel go.
enum Route {
    Client { conn: Conn, channel: u32 },
    Log(File),
}

#[derive(Default)]
struct MainState {
    started: bool,
    exit: Option<(Option<i32>, Option<i32>)>,
}

struct Inner {
    agent: Mutex<UnixStream>,
    agent_reader: Mutex<Option<UnixStream>>,
    routes: Mutex<HashMap<u32, Route>>,
    next_channel: AtomicU32,
    main: Mutex<MainState>,
    main_cv: Condvar,
    main_spec: ProcessSpec,
    main_log: std::path::PathBuf,
    clients: Mutex<Vec<Conn>>,
    stop_requested: AtomicBool,
    agent_gone: AtomicBool,
    vmm_pid: u32,
    attach: bool,
    box_id: String,
    network: super::setup::SharedNetwork,
    paths: BoxPaths,
}

/// The shim's frame router. Cheap to clone (shared state).
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

impl Router {
    pub fn new(
        agent: UnixStream,
        record: &BoxRecord,
        paths: &BoxPaths,
        vmm_pid: u32,
        attach: bool,
        network: super::setup::SharedNetwork,
    ) -> std::io::Result<Router> {
        let reader = agent.try_clone()?;
        Ok(Router {
            inner: Arc::new(Inner {
                agent: Mutex::new(agent),
                agent_reader: Mutex::new(Some(reader)),
                routes: Mutex::new(HashMap::new()),
                next_channel: AtomicU32::new(MAIN_CHANNEL + 1),
                main: Mutex::new(MainState::default()),
                main_cv: Condvar::new(),
                main_spec: record.config.main.clone(),
                main_log: paths.main_log(),
                clients: Mutex::new(Vec::new()),
                stop_requested: AtomicBool::new(false),
                agent_gone: AtomicBool::new(false),
                vmm_pid,
                attach,
                box_id: record.id.clone(),
                network,
                paths: paths.clone(),
            }),
        })
    }

    fn send_agent(&self, frame: &Frame) -> std::io::Result<()> {
        let mut agent = self.inner.agent.lock().unwrap();
        write_frame(&mut *agent, frame)
    }

    /// Reads the agent's frames until the guest goes away.
    pub fn spawn_agent_reader(&self) {
        let this = self.clone();
        let mut reader = self
            .inner
            .agent_reader
            .lock()
            .unwrap()
            .take()
            .expect("reader taken once");
        std::thread::spawn(move || {
            loop {
                match read_frame(&mut reader) {
                    Ok(Some(frame)) => this.route_agent_frame(frame),
                    Ok(None) => break,
                    Err(e) => {
                        warn!("agent link: {e}");
                        break;
                    }
                }
            }
            this.inner.agent_gone.store(true, Ordering::SeqCst);
            debug!("agent link closed");
        });
    }

    fn route_agent_frame(&self, frame: Frame) {
        if frame.channel == BOX_CHANNEL {
            if let Ok(msg) = frame.parse_control() {
                info!(?msg, "agent");
            }
            return;
        }
        let finished = frame.tag == Tag::Control
            && matches!(
                frame.parse_control(),
                Ok(Control::Exited { .. } | Control::Error { .. })
            );
        if frame.channel == MAIN_CHANNEL && finished {
            self.record_main_exit(&frame);
        }
        let mut routes = self.inner.routes.lock().unwrap();
        let delivered = match routes.get_mut(&frame.channel) {
            Some(Route::Client { conn, channel }) => {
                let out = Frame {
                    channel: *channel,
                    tag: frame.tag,
                    body: frame.body.clone(),
                };
                let mut c = conn.lock().unwrap();
                write_frame(&mut *c, &out).is_ok()
            }
            Some(Route::Log(file)) => {
                if frame.tag != Tag::Control {
                    let _ = file.write_all(&frame.body);
                }
                true
            }
            None => true,
        };
        if frame.channel == MAIN_CHANNEL && !delivered {
            // The attached CLI went away: keep the main process's output in its log.
            if let Ok(file) = self.open_main_log() {
                routes.insert(MAIN_CHANNEL, Route::Log(file));
            }
        }
        if finished {
            routes.remove(&frame.channel);
        }
        drop(routes);
        if frame.channel == MAIN_CHANNEL && finished {
            self.request_poweroff(None);
        }
    }

    fn record_main_exit(&self, frame: &Frame) {
        let exit = match frame.parse_control() {
            Ok(Control::Exited { code, signal }) => (code, signal),
            Ok(Control::Error { message }) => {
                if let Ok(mut log) = self.open_main_log() {
                    let _ = writeln!(log, "boxlite: {message}");
                }
                (Some(exit_code_for_exec_error(&message)), None)
            }
            _ => return,
        };
        let mut main = self.inner.main.lock().unwrap();
        main.exit = Some(exit);
        self.inner.main_cv.notify_all();
    }

    fn open_main_log(&self) -> std::io::Result<File> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.inner.main_log)
    }

    /// Asks the agent to stop everything and power off.
    /// Asks the guest to power off, giving its processes `grace` (the agent's default when
    /// `None`) between SIGTERM and SIGKILL.
    pub fn request_poweroff(&self, grace: Option<Duration>) {
        let shutdown = Control::Shutdown {
            grace_secs: grace.map(|g| g.as_secs()),
        };
        if self
            .send_agent(&Frame::control(BOX_CHANNEL, &shutdown))
            .is_err()
        {
            warn!("cannot reach the agent to shut down");
        }
    }

    /// Accepts CLI connections on the control socket.
    pub fn spawn_listener(&self, listener: UnixListener) {
        let this = self.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let this = this.clone();
                std::thread::spawn(move || this.serve_client(conn));
            }
        });
    }

    /// Starts the main process now, unless a CLI is about to attach to it.
    pub fn start_main_unless_attaching(&self) {
        if self.inner.main_spec.argv.is_empty() {
            return; // an idle Box: driven by exec alone
        }
        if !self.inner.attach {
            self.start_main(None, false, 0, 0);
            return;
        }
        let this = self.clone();
        std::thread::spawn(move || {
            std::thread::sleep(ATTACH_GRACE);
            if !this.inner.main.lock().unwrap().started {
                warn!("nobody attached; starting the main process detached");
                this.start_main(None, false, 0, 0);
            }
        });
    }

    fn start_main(&self, client: Option<(Conn, u32)>, stdin: bool, rows: u16, cols: u16) -> bool {
        {
            let mut main = self.inner.main.lock().unwrap();
            if main.started {
                return false;
            }
            main.started = true;
        }
        let route = match client {
            Some((conn, channel)) => Route::Client { conn, channel },
            None => match self.open_main_log() {
                Ok(f) => Route::Log(f),
                Err(e) => {
                    warn!("cannot open main.log: {e}");
                    return false;
                }
            },
        };
        self.inner
            .routes
            .lock()
            .unwrap()
            .insert(MAIN_CHANNEL, route);
        let spec = &self.inner.main_spec;
        let req = ExecRequest {
            argv: spec.argv.clone(),
            env: spec.env.clone(),
            cwd: spec.cwd.clone(),
            user: spec.user.clone(),
            tty: spec.tty,
            stdin,
            rows,
            cols,
        };
        if self
            .send_agent(&Frame::control(MAIN_CHANNEL, &Control::Exec(Box::new(req))))
            .is_err()
        {
            warn!("cannot send the main process to the agent");
        }
        true
    }

    fn serve_client(&self, stream: UnixStream) {
        let Ok(writer) = stream.try_clone() else {
            return;
        };
        let conn: Conn = Arc::new(Mutex::new(writer));
        self.inner.clients.lock().unwrap().push(conn.clone());
        let mut reader = stream;
        // client channel → agent channel
        let mut channels: HashMap<u32, u32> = HashMap::new();
        while let Ok(Some(frame)) = read_frame(&mut reader) {
            if frame.tag == Tag::Control {
                match frame.parse_control() {
                    Ok(Control::Exec(req)) => {
                        let global = self.inner.next_channel.fetch_add(1, Ordering::SeqCst);
                        channels.insert(frame.channel, global);
                        self.inner.routes.lock().unwrap().insert(
                            global,
                            Route::Client {
                                conn: conn.clone(),
                                channel: frame.channel,
                            },
                        );
                        let fwd = Frame::control(global, &Control::Exec(req));
                        if let Err(e) = self.send_agent(&fwd) {
                            self.reply(&conn, frame.channel, &format!("agent unreachable: {e}"));
                        }
                        continue;
                    }
                    Ok(Control::Attach { stdin, rows, cols }) => {
                        self.attach(&conn, frame.channel, stdin, rows, cols);
                        channels.insert(frame.channel, MAIN_CHANNEL);
                        continue;
                    }
                    Ok(Control::Stop { timeout_secs }) => {
                        self.stop(Duration::from_secs(timeout_secs));
                        continue;
                    }
                    Ok(
                        query @ (Control::Stats
                        | Control::Ports
                        | Control::PortAdd { .. }
                        | Control::PortRemove { .. }),
                    ) => {
                        let answer = match self.network_query(query) {
                            Ok(answer) => answer,
                            Err(message) => Control::Error { message },
                        };
                        let mut c = conn.lock().unwrap();
                        let _ = write_frame(&mut *c, &Frame::control(frame.channel, &answer));
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        self.reply(&conn, frame.channel, &e.to_string());
                        continue;
                    }
                }
            }
            match channels.get(&frame.channel) {
                Some(&global) => {
                    let _ = self.send_agent(&Frame {
                        channel: global,
                        ..frame
                    });
                }
                None => self.reply(&conn, frame.channel, "no session on this channel"),
            }
        }
        self.client_gone(&conn, &channels);
    }

    /// Answers the network queries of `boxlite stats` and `boxlite port`.
    fn network_query(&self, query: Control) -> Result<Control, String> {
        let guard = self.inner.network.lock().unwrap();
        let info = |value: serde_json::Value| {
            Ok(Control::Info {
                json: value.to_string(),
            })
        };
        let Some(net) = guard.as_ref() else {
            return match query {
                Control::Stats => info(serde_json::json!({ "network": null })),
                Control::Ports => info(serde_json::json!([])),
                _ => Err("the box has no network (--network none)".into()),
            };
        };
        match query {
            Control::Stats => info(serde_json::json!({ "network": net.metrics() })),
            Control::Ports => info(serde_json::to_value(net.port_forwards()).unwrap_or_default()),
            Control::PortAdd { forward } => {
                let spec: PortForward = forward
                    .parse()
                    .map_err(|e: crate::net::NetworkError| e.to_string())?;
                let added = net
                    .add_port_forward(spec)
                    .map_err(|e| crate::shim::error_chain(&e))?;
                self.record_forwards(net);
                info(serde_json::to_value(added).unwrap_or_default())
            }
            Control::PortRemove { forward } => {
                let spec: PortForward = forward
                    .parse()
                    .map_err(|e: crate::net::NetworkError| e.to_string())?;
                net.remove_port_forward(&spec)
                    .map_err(|e| crate::shim::error_chain(&e))?;
                self.record_forwards(net);
                Ok(Control::Done)
            }
            _ => Err("unsupported query".into()),
        }
    }

    fn record_forwards(&self, net: &crate::net::NetworkHandle) {
        let path = self.inner.paths.network_file();
        let Ok(text) = std::fs::read_to_string(&path) else {
            return;
        };
        let Ok(mut config) = serde_json::from_str::<crate::net::NetworkConfig>(&text) else {
            return;
        };
        config.port_forwards = net.port_forwards();
        super::setup::write_network_file(&self.inner.paths, &config);
    }

    fn attach(&self, conn: &Conn, channel: u32, stdin: bool, rows: u16, cols: u16) {
        if self.inner.main_spec.argv.is_empty() {
            self.reply(conn, channel, "this box has no main process to attach to");
            return;
        }
        if self.start_main(Some((conn.clone(), channel)), stdin, rows, cols) {
            return;
        }
        let exit = self.inner.main.lock().unwrap().exit;
        if let Some((code, signal)) = exit {
            let mut c = conn.lock().unwrap();
            let _ = write_frame(
                &mut *c,
                &Frame::control(channel, &Control::Exited { code, signal }),
            );
            return;
        }
        self.inner.routes.lock().unwrap().insert(
            MAIN_CHANNEL,
            Route::Client {
                conn: conn.clone(),
                channel,
            },
        );
    }

    fn reply(&self, conn: &Conn, channel: u32, message: &str) {
        let mut c = conn.lock().unwrap();
        let _ = write_frame(
            &mut *c,
            &Frame::control(
                channel,
                &Control::Error {
                    message: message.into(),
                },
            ),
        );
    }

    /// A CLI disconnected: its exec sessions are killed (nobody can read them any more); the main
    /// process keeps running with its output going to the log.
    fn client_gone(&self, conn: &Conn, channels: &HashMap<u32, u32>) {
        for &global in channels.values() {
            let mut routes = self.inner.routes.lock().unwrap();
            let ours = matches!(routes.get(&global), Some(Route::Client { conn: c, .. }) if Arc::ptr_eq(c, conn));
            if !ours {
                continue;
            }
            if global == MAIN_CHANNEL {
                if let Ok(f) = self.open_main_log() {
                    routes.insert(MAIN_CHANNEL, Route::Log(f));
                }
                continue;
            }
            routes.remove(&global);
            drop(routes);
            let _ = self.send_agent(&Frame::control(
                global,
                &Control::Signal {
                    signal: libc::SIGKILL,
                },
            ));
        }
        self.inner
            .clients
            .lock()
            .unwrap()
            .retain(|c| !Arc::ptr_eq(c, conn));
    }

    /// Clean stop, as `docker stop -t`: the guest's processes get SIGTERM and `timeout` to
    /// exit before SIGKILL, then the guest syncs and powers off; the VMM is killed if it is
    /// still there [`super::POWEROFF_MARGIN`] after that.
    pub fn stop(&self, timeout: Duration) {
        if self.inner.stop_requested.swap(true, Ordering::SeqCst) {
            return;
        }
        info!(box_id = %self.inner.box_id, ?timeout, "stop requested");
        self.request_poweroff(Some(timeout));
        let pid = self.inner.vmm_pid as i32;
        std::thread::spawn(move || {
            std::thread::sleep(timeout + super::POWEROFF_MARGIN);
            // SAFETY: kill(2) on the VMM's pid, which this process spawned and has not reaped
            // (the main thread reaps it only after it exits, so the pid cannot be recycled).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
    }

    /// Why the guest stopped, given the VMM's exit status, and the main process's exit code.
    pub fn outcome(&self, status: ExitStatus) -> (String, Option<i32>) {
        use std::os::unix::process::ExitStatusExt;
        let main_exit = self.inner.main.lock().unwrap().exit;
        if self.inner.stop_requested.load(Ordering::SeqCst) {
            let code = main_exit.map(|(c, s)| c.unwrap_or(128 + s.unwrap_or(0)));
            return ("stopped".into(), code);
        }
        if let Some((code, signal)) = main_exit {
            let code = code.unwrap_or(128 + signal.unwrap_or(0));
            return (format!("main process exited with code {code}"), Some(code));
        }
        let how = match (status.code(), status.signal()) {
            (_, Some(sig)) => format!("VMM killed by signal {sig}"),
            (Some(code), _) => format!("VMM exited unexpectedly with code {code}"),
            _ => "VMM exited unexpectedly".into(),
        };
        (how, None)
    }

    /// Closes every CLI connection (they see end of stream).
    pub fn close_clients(&self) {
        for conn in self.inner.clients.lock().unwrap().iter() {
            let c = conn.lock().unwrap();
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// The exit status a failed exec maps to, as docker does: 127 for a missing command, 126 for one
/// that cannot be executed.
pub fn exit_code_for_exec_error(message: &str) -> i32 {
    let m = message.to_ascii_lowercase();
    if m.contains("not found") || m.contains("no such file") {
        127
    } else {
        126
    }
}
