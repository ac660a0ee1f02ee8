//! The virtio-serial port that links the agent to the host (the shim reaches it through a unix
//! socket), framed as `boxlite_protocol` describes.
//!
//! The port is found by name under `/sys/class/virtio-ports/*/name` (no udev here) and kept open
//! for the agent's whole life (Linux allows one open per port). It is used non-blocking: a
//! blocking write makes the guest kernel spin until the host has consumed the buffer, which under
//! TCG costs most of the throughput; non-blocking writes queue up to the virtqueue's size and wait
//! in `poll` only when it is full. While no host is connected, Linux makes reads return 0 and
//! `poll` report POLLHUP at once; the reader then drops any partial frame and waits for the next
//! host, and writers wait in short sleeps, so a shim that reconnects finds the agent still serving.
//!
//! Known shortcomings: a host that reconnects faster than the agent notices the disconnection
//! (tens of milliseconds) may still see a half frame completed with its own bytes; and bytes of a
//! guest frame that QEMU held when the host went away are lost, so the next host may start reading
//! in the middle of a frame. The protocol has no resynchronisation marker for either case.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use boxlite_protocol::{write_frame, Control, Frame, Tag, MAX_BODY};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

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

/// Opens the port for reading and writing, non-blocking.
pub fn open(path: &PathBuf) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

/// Waits until the port is ready for `events`; returns at once (after a short sleep) while no host
/// is connected, since the port then reports POLLHUP continuously.
fn wait_for(file: &File, events: PollFlags) {
    let mut fds = [PollFd::new(file.as_fd(), events)];
    match poll(&mut fds, PollTimeout::from(100u16)) {
        Ok(_) => {
            let revents = fds[0].revents().unwrap_or(PollFlags::empty());
            if !revents.intersects(events) {
                thread::sleep(Duration::from_millis(20));
            }
        }
        Err(_) => thread::sleep(Duration::from_millis(20)),
    }
}

/// Reads the port. Waits while nothing is there; reports a host that went away as
/// `ConnectionReset`, so that a frame cut short by the disconnection is dropped rather than
/// completed with the next host's bytes.
#[derive(Debug)]
pub struct PortReader {
    file: File,
}

impl PortReader {
    pub fn new(file: File) -> PortReader {
        PortReader { file }
    }

    /// Waits until a host is connected to the port.
    pub fn wait_for_host(&self) {
        loop {
            let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLIN)];
            let hung_up = match poll(&mut fds, PollTimeout::from(100u16)) {
                Ok(_) => fds[0]
                    .revents()
                    .is_none_or(|r| r.contains(PollFlags::POLLHUP)),
                Err(_) => true,
            };
            if !hung_up {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Read for PortReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.file.read(buf) {
                // Linux returns 0 once the buffered data is read and no host is connected.
                Ok(0) if !buf.is_empty() => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "no host connected to the agent port",
                    ))
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait_for(&self.file, PollFlags::POLLIN)
                }
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
        let file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        write_frame(&mut PortWriter(&file), frame)
    }
}

/// Writes to the non-blocking port, waiting in `poll` while its queue is full or no host is
/// connected.
struct PortWriter<'a>(&'a File);

impl Write for PortWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match (&mut &*self.0).write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait_for(self.0, PollFlags::POLLOUT)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Seek;

    use boxlite_protocol::read_frame;

    use super::*;

    #[test]
    fn stream_data_is_split_into_frames_of_at_most_max_body() {
        let file = tempfile::tempfile().unwrap();
        let sink = FrameSink::new(file.try_clone().unwrap());
        let data: Vec<u8> = (0..(2 * MAX_BODY + 10)).map(|i| i as u8).collect();
        sink.data(4, Tag::Stdout, &data).unwrap();
        sink.control(4, &Control::Started { pid: 7 }).unwrap();

        let mut file = file;
        file.rewind().unwrap();
        let sizes: Vec<usize> = std::iter::from_fn(|| read_frame(&mut file).unwrap())
            .map(|f| f.body.len())
            .collect();
        assert_eq!(sizes[..3], [MAX_BODY, MAX_BODY, 10]);
        assert_eq!(sizes.len(), 4, "the control frame follows the data");
    }
}
