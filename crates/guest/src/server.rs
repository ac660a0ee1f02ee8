//! Serves the host: reads frames from the port and dispatches them. Channel 0 addresses the Box
//! (`Setup`, `Shutdown`); every other channel is one exec session, opened by `Exec`.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use boxlite_protocol::{read_frame, Control, Frame, Tag, BOX_CHANNEL, PROTOCOL_VERSION};

use crate::console::log;
use crate::port::{FrameSink, PortReader};
use crate::reaper::Reaper;
use crate::session::{Input, Session};
use crate::setup::{self, Stage};
use crate::shutdown;

type Sessions = Arc<Mutex<HashMap<u32, Arc<Session>>>>;

/// How many sessions have not yet sent their last message.
type Unreported = Arc<AtomicUsize>;

/// The agent's state while serving.
#[derive(Debug)]
pub struct Server {
    sink: Arc<FrameSink>,
    reaper: &'static Reaper,
    sessions: Sessions,
    unreported: Unreported,
    stage: Stage,
}

impl Server {
    pub fn new(sink: FrameSink, reaper: &'static Reaper) -> Server {
        Server {
            sink: Arc::new(sink),
            reaper,
            sessions: Arc::default(),
            unreported: Arc::default(),
            stage: Stage::Initramfs,
        }
    }

    /// Reads and handles frames forever.
    pub fn serve(mut self, mut reader: PortReader) -> ! {
        loop {
            match read_frame(&mut reader) {
                Ok(Some(frame)) => self.handle(frame),
                Ok(None) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    reader.wait_for_host();
                    log!("host connected");
                }
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    log!("bad frame from the host: {e}");
                }
                Err(e) => {
                    log!("reading the agent port failed: {e}");
                    thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn handle(&mut self, frame: Frame) {
        let channel = frame.channel;
        match frame.tag {
            Tag::Control => match frame.parse_control() {
                Ok(msg) if channel == BOX_CHANNEL => self.box_control(msg),
                Ok(msg) => self.session_control(channel, msg),
                Err(e) => self.reply(
                    channel,
                    Control::Error {
                        message: e.to_string(),
                    },
                ),
            },
            Tag::Stdin => {
                if let Some(session) = self.session(channel) {
                    session.input(Input::Data(frame.body));
                }
            }
            Tag::Stdout | Tag::Stderr => {
                log!("ignoring an output frame sent by the host on channel {channel}");
            }
        }
    }

    fn box_control(&mut self, msg: Control) {
        match msg {
            Control::Setup(setup) => {
                log!("setup of box {:?}", setup.hostname);
                let reply = match setup::assemble(&setup, &mut self.stage, self.reaper) {
                    Ok(ip) => {
                        log!("ready");
                        Control::Ready {
                            version: PROTOCOL_VERSION,
                            ip,
                        }
                    }
                    Err(e) => {
                        let message = error_chain(&e);
                        log!("setup failed: {message}");
                        Control::Error { message }
                    }
                };
                self.reply(BOX_CHANNEL, reply);
            }
            Control::Shutdown { grace_secs } => {
                let unreported = Arc::clone(&self.unreported);
                let grace = grace_secs.map_or(shutdown::GRACE, Duration::from_secs);
                shutdown::power_off(grace, move || wait_for_reports(&unreported))
            }
            other => self.reply(
                BOX_CHANNEL,
                Control::Error {
                    message: format!("unexpected message on channel 0: {other:?}"),
                },
            ),
        }
    }

    fn session_control(&mut self, channel: u32, msg: Control) {
        match msg {
            Control::Exec(req) => self.start_session(channel, *req),
            Control::StdinEof => {
                if let Some(session) = self.session(channel) {
                    session.input(Input::Eof);
                }
            }
            Control::Signal { signal } => {
                if let Some(session) = self.session(channel) {
                    if let Err(message) = session.signal(signal) {
                        log!("channel {channel}: {message}");
                    }
                }
            }
            Control::Resize { rows, cols } => {
                if let Some(session) = self.session(channel) {
                    session.resize(rows, cols);
                }
            }
            other => self.reply(
                channel,
                Control::Error {
                    message: format!("unexpected message on channel {channel}: {other:?}"),
                },
            ),
        }
    }

    fn start_session(&mut self, channel: u32, req: boxlite_protocol::ExecRequest) {
        if self.stage != Stage::Ready {
            let message = "the Box is not set up yet (no successful Setup)".to_string();
            return self.reply(channel, Control::Error { message });
        }
        let (session, input) = Session::new(channel);
        {
            let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            if sessions.contains_key(&channel) {
                drop(sessions);
                let message = format!("channel {channel} already has a running session");
                return self.reply(channel, Control::Error { message });
            }
            sessions.insert(channel, Arc::clone(&session));
        }
        let sink = Arc::clone(&self.sink);
        let sessions = Arc::clone(&self.sessions);
        let unreported = Arc::clone(&self.unreported);
        unreported.fetch_add(1, Ordering::SeqCst);
        let reaper = self.reaper;
        let spawned = thread::Builder::new()
            .name(format!("session-{channel}"))
            .spawn(move || {
                let last = session.run(&req, input, &sink, reaper);
                // Free the channel first: a host that reuses it right after `Exited` must find
                // it free.
                sessions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&channel);
                if let Err(e) = sink.control(channel, &last) {
                    log!("channel {channel}: cannot report the end of the session: {e}");
                }
                unreported.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            self.unreported.fetch_sub(1, Ordering::SeqCst);
            self.sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&channel);
            let message = format!("cannot start a session thread: {e}");
            self.reply(channel, Control::Error { message });
        }
    }

    fn session(&self, channel: u32) -> Option<Arc<Session>> {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&channel)
            .cloned()
    }

    fn reply(&self, channel: u32, msg: Control) {
        if let Err(e) = self.sink.control(channel, &msg) {
            log!("cannot reply on channel {channel}: {e}");
        }
    }
}

/// Waits until every session has sent its last message, for at most two seconds.
fn wait_for_reports(unreported: &AtomicUsize) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while unreported.load(Ordering::SeqCst) > 0 {
        if Instant::now() >= deadline {
            log!("sessions still reporting at power-off");
            return;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// An error and its causes on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}
