//! The virtio-serial port that links the agent to the host (the shim reaches it through a unix
//! socket), framed as `boxlite_protocol` describes.
//!
//! The port is found by name under `/sys/class/virtio-ports/*/name` (no udev here) and kept open
//! for the agent's whole life. While no host is connected, Linux makes `read` return 0 and `write`
//! block; [`PortReader`] turns the former into a wait, so a shim that reconnects finds the agent
//! still serving. Known shortcoming: a host that disconnects in the middle of a frame leaves the
//! rest of that frame unsent, and the next connection starts out of step; the agent then logs
//! framing errors until the stream happens to line up again.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use boxlite_protocol::{write_frame, Control, Frame, Tag, MAX_BODY};

/// Finds `/dev/<port>` for the port named `name`, waiting up to `timeout` for it to appear.
pub fn find(name: &str, timeout: Duration) -> io::Result<PathBuf> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(entries) = fs::read_dir("/sys/class/virtio-ports") {
            for entry in entries.flatten() {
                let port_name = fs::read_to_string(entry.path().join("name")).unwrap_or_default();
                if port_name.trim() == name {
                    return Ok(PathBuf::from("/dev").join(entry.file_name()));
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no virtio-serial port named {name} under /sys/class/virtio-ports"),
            ));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Opens the port for reading and writing.
pub fn open(path: &PathBuf) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).open(path)
}

/// Reads the port; while no host is connected (reads return 0) it waits instead of ending.
#[derive(Debug)]
pub struct PortReader {
    file: File,
}

impl PortReader {
    pub fn new(file: File) -> PortReader {
        PortReader { file }
    }
}

impl Read for PortReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.file.read(buf) {
                Ok(0) if !buf.is_empty() => thread::sleep(Duration::from_millis(20)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }
}

/// The writing side of the port, shared by every session; one frame is written at a time.
#[derive(Debug)]
pub struct FrameSink {
    file: Mutex<File>,
}

impl FrameSink {
    pub fn new(file: File) -> FrameSink {
        FrameSink {
            file: Mutex::new(file),
        }
    }

    /// Sends a control message on `channel`.
    pub fn control(&self, channel: u32, msg: &Control) -> io::Result<()> {
        self.frame(&Frame::control(channel, msg))
    }

    /// Sends stream bytes on `channel`, split into frames of at most `MAX_BODY` bytes.
    pub fn data(&self, channel: u32, tag: Tag, bytes: &[u8]) -> io::Result<()> {
        for chunk in bytes.chunks(MAX_BODY) {
            self.frame(&Frame::data(channel, tag, chunk.to_vec()))?;
        }
        Ok(())
    }

    fn frame(&self, frame: &Frame) -> io::Result<()> {
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        write_frame(&mut *file, frame)?;
        file.flush()
    }
}
