//! The wire protocol spoken between the host and the guest agent, and between the CLI and a Box's
//! shim.
//!
//! Both links carry the same frames over a byte stream (a virtio-serial port in the guest, unix
//! sockets on the host):
//!
//! ```text
//! u32 BE  length of everything after this field (channel + tag + body)
//! u32 BE  channel: 0 is the Box itself (setup, shutdown); every exec session has its own
//! u8      tag: what the body is (see [`Tag`])
//! [u8]    body: raw bytes for stream tags, one JSON [`Control`] message for `Tag::Control`
//! ```
//!
//! Stream data is never JSON-encoded, so a 50 MB stdout costs its own bytes plus 9 per frame. A
//! frame body is at most [`MAX_BODY`] bytes; writers split larger data.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// Name of the virtio-serial port the agent listens on (`/sys/class/virtio-ports/*/name`).
pub const AGENT_PORT_NAME: &str = "boxlite.agent";
/// Largest frame body a reader accepts; writers split stream data to stay below it.
pub const MAX_BODY: usize = 256 * 1024;
/// The channel that addresses the Box as a whole rather than one exec session.
pub const BOX_CHANNEL: u32 = 0;
/// Protocol revision; the agent reports it in [`Control::Ready`].
pub const PROTOCOL_VERSION: u32 = 1;

/// What a frame's body holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Tag {
    /// One JSON-encoded [`Control`] message.
    Control = 0,
    /// Bytes for the session's stdin (host → guest).
    Stdin = 1,
    /// Bytes from the session's stdout, or from its terminal when it has one (guest → host).
    Stdout = 2,
    /// Bytes from the session's stderr (guest → host).
    Stderr = 3,
}

impl Tag {
    fn from_u8(v: u8) -> io::Result<Tag> {
        Ok(match v {
            0 => Tag::Control,
            1 => Tag::Stdin,
            2 => Tag::Stdout,
            3 => Tag::Stderr,
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unknown frame tag {other}"),
                ))
            }
        })
    }
}

/// One unit on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub channel: u32,
    pub tag: Tag,
    pub body: Vec<u8>,
}

impl Frame {
    /// A control frame carrying `msg` on `channel`.
    pub fn control(channel: u32, msg: &Control) -> Frame {
        let body = serde_json::to_vec(msg).expect("control messages always serialize");
        Frame {
            channel,
            tag: Tag::Control,
            body,
        }
    }

    /// A stream frame.
    pub fn data(channel: u32, tag: Tag, body: Vec<u8>) -> Frame {
        Frame { channel, tag, body }
    }

    /// Decodes the body of a control frame.
    pub fn parse_control(&self) -> io::Result<Control> {
        if self.tag != Tag::Control {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a control frame",
            ));
        }
        serde_json::from_slice(&self.body).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad control message: {e}"),
            )
        })
    }
}

/// Writes one frame. The caller serialises writers (one frame must not interleave with another).
pub fn write_frame<W: Write + ?Sized>(w: &mut W, frame: &Frame) -> io::Result<()> {
    if frame.body.len() > MAX_BODY {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "frame body too large",
        ));
    }
    let len = (frame.body.len() + 5) as u32;
    let mut buf = Vec::with_capacity(frame.body.len() + 9);
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&frame.channel.to_be_bytes());
    buf.push(frame.tag as u8);
    buf.extend_from_slice(&frame.body);
    w.write_all(&buf)?;
    w.flush()
}

/// Reads one frame; `Ok(None)` on a clean end of stream between frames.
pub fn read_frame<R: Read + ?Sized>(r: &mut R) -> io::Result<Option<Frame>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if !(5..=MAX_BODY + 5).contains(&len) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame length {len} out of range"),
        ));
    }
    let mut head = [0u8; 5];
    r.read_exact(&mut head)?;
    let channel = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let tag = Tag::from_u8(head[4])?;
    let mut body = vec![0u8; len - 5];
    r.read_exact(&mut body)?;
    Ok(Some(Frame { channel, tag, body }))
}

/// Control messages. Each names its direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Control {
    /// host → guest, channel 0, first message: how to assemble the Box.
    Setup(Box<GuestSetup>),
    /// guest → host, channel 0: the Box is assembled and accepts exec requests.
    Ready { version: u32, ip: Option<String> },
    /// host → guest, on a fresh channel: start a process.
    Exec(Box<ExecRequest>),
    /// guest → host: the process of this channel started.
    Started { pid: u32 },
    /// host → guest: no more stdin for this channel.
    StdinEof,
    /// host → guest: deliver a signal to the channel's process (group).
    Signal { signal: i32 },
    /// host → guest: the terminal of this channel changed size.
    Resize { rows: u16, cols: u16 },
    /// guest → host: the channel's process ended; all of its output was sent before this.
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
    },
    /// either way: the request on this channel failed; the channel is finished.
    Error { message: String },
    /// host → guest, channel 0: stop every process (SIGTERM, then SIGKILL after `grace_secs`,
    /// the agent's default when absent), sync and unmount disks, power off.
    Shutdown {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        grace_secs: Option<u64>,
    },
    /// CLI → shim, channel 0: stop the Box (clean shutdown, hard kill after `timeout_secs`).
    Stop { timeout_secs: u64 },
    /// shim → CLI: the requested Box-level operation finished.
    Done,
    /// CLI → shim, on a fresh channel: attach to the Box's main process (started by the shim
    /// when the Box was started attached). Its output and exit arrive on this channel.
    Attach { stdin: bool, rows: u16, cols: u16 },
    /// CLI → shim, channel 0: network and resource counters; answered with `Info`.
    Stats,
    /// CLI → shim: add a port forward (`[IP:]HOSTPORT:GUESTPORT[/udp]`); answered with `Info`
    /// holding the forward in effect (the chosen port when HOSTPORT was 0).
    PortAdd { forward: String },
    /// CLI → shim: remove a port forward; answered with `Done`.
    PortRemove { forward: String },
    /// CLI → shim: the forwards in effect; answered with `Info`.
    Ports,
    /// shim → CLI: the JSON answer to a query.
    Info { json: String },
}

/// Everything the agent needs to assemble the Box, sent once per boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct GuestSetup {
    /// The Box's host name (also written to /etc/hostname by `files`).
    pub hostname: String,
    /// The Box's root disk: a virtio-blk device with this serial, holding an ext4 filesystem.
    pub root: BlockDevice,
    /// Grow the root filesystem to fill its device (online resize after mount).
    pub grow_root: bool,
    /// Further mounts, in order, after the root is mounted (paths inside the Box).
    #[serde(default)]
    pub mounts: Vec<MountSpec>,
    /// Network configuration; `None` means the Box has no NIC and sees only `lo`.
    #[serde(default)]
    pub network: Option<NetworkSetup>,
    /// Files written into the Box's root after mount (resolv.conf, hosts, hostname).
    #[serde(default)]
    pub files: Vec<FileSpec>,
}

/// A virtio-blk device, found in the guest by its serial (`/sys/block/vdX/serial`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct BlockDevice {
    pub serial: String,
    pub fstype: String,
}

/// Where a mount comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MountSource {
    /// A virtio-blk disk with this serial. `format_if_empty` makes a filesystem of `fstype` on a
    /// device that has none (first attach of a fresh volume).
    Block {
        serial: String,
        fstype: String,
        format_if_empty: bool,
    },
    /// A virtiofs share with this tag.
    Virtiofs { tag: String },
}

/// One mount inside the Box.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    pub source: MountSource,
    /// Absolute path inside the Box; created if missing.
    pub target: String,
    pub readonly: bool,
    /// The share is a single file: `target` is a file, bind-mounted from inside the share.
    #[serde(default)]
    pub file: Option<String>,
}

/// How the guest's NIC gets its address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSetup {
    /// MAC address of the virtio-net device (`52:54:00:…`).
    pub mac: String,
    /// Seconds to wait for a DHCP lease before giving up.
    pub dhcp_timeout_secs: u64,
}

/// A file the agent writes inside the Box's root before any process runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSpec {
    pub path: String,
    pub contents: String,
    pub mode: u32,
}

/// One process to run in the Box.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ExecRequest {
    /// argv\[0\] is looked up in `PATH` from `env` when it holds no slash.
    pub argv: Vec<String>,
    /// `KEY=VALUE` pairs: the whole environment of the process.
    pub env: Vec<String>,
    /// Working directory inside the Box; created if missing, as docker does.
    pub cwd: String,
    /// `name`, `uid`, `name:group`, `uid:gid`; resolved against the Box's /etc/passwd and
    /// /etc/group. Empty means root.
    pub user: String,
    /// Run under a pseudo-terminal; stdout carries the terminal's output and stderr is unused.
    pub tty: bool,
    /// The host sends stdin; otherwise the process reads from /dev/null.
    pub stdin: bool,
    #[serde(default)]
    pub rows: u16,
    #[serde(default)]
    pub cols: u16,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_back_to_back() {
        let mut buf = Vec::new();
        let a = Frame::control(0, &Control::Stop { timeout_secs: 3 });
        let b = Frame::data(7, Tag::Stdout, b"hello\n".to_vec());
        write_frame(&mut buf, &a).unwrap();
        write_frame(&mut buf, &b).unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame(&mut r).unwrap().unwrap(), a);
        assert_eq!(read_frame(&mut r).unwrap().unwrap(), b);
        assert!(read_frame(&mut r).unwrap().is_none());
        assert_eq!(
            a.parse_control().unwrap(),
            Control::Stop { timeout_secs: 3 },
            "control body decodes to what was sent"
        );
    }

    #[test]
    fn oversized_and_truncated_frames_are_errors() {
        let huge = (MAX_BODY as u32 + 6).to_be_bytes();
        assert!(read_frame(&mut &huge[..]).is_err());
        let mut buf = Vec::new();
        write_frame(&mut buf, &Frame::data(1, Tag::Stderr, vec![1, 2, 3])).unwrap();
        buf.pop();
        assert!(
            read_frame(&mut &buf[..]).is_err(),
            "a frame cut short is not a clean EOF"
        );
        let bad_tag = [0, 0, 0, 5, 0, 0, 0, 1, 9];
        assert!(read_frame(&mut &bad_tag[..]).is_err());
    }
}
