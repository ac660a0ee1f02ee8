//! One TCP connection of usernet: a smoltcp socket facing the guest, glued to a non-blocking
//! host socket (NAT and port forwards) or to the DNS forwarder (DNS over TCP, RFC 7766).
//!
//! Data moves only while the other side has room: bytes from the host are read straight into the
//! smoltcp send buffer, bytes from the guest are written straight from its receive buffer, so a
//! connection holds at most its two socket buffers. Half-close is carried through both ways: the
//! guest's FIN becomes `shutdown(Write)` on the host socket after all data was written, the
//! host's EOF becomes our FIN after all data was queued. A reset on either side resets the other.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddrV4};
use std::time::Instant;

use mio::net::TcpStream;
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::{Socket, State};

/// What the guest side of the connection talks to.
#[derive(Debug)]
pub enum Peer {
    /// A host socket; `connected` once the non-blocking connect finished.
    Host {
        stream: TcpStream,
        connected: bool,
        /// The guest's SYN, replayed into smoltcp once the host accepted.
        syn: Option<Vec<u8>>,
        since: Instant,
    },
    /// The DNS forwarder: length-prefixed queries in, replies out.
    Dns {
        inbuf: Vec<u8>,
        outbuf: Vec<u8>,
        in_flight: usize,
    },
}

/// A guest-facing TCP connection.
#[derive(Debug)]
pub struct TcpConn {
    /// (guest endpoint, the endpoint the guest talks to)
    pub tuple: (SocketAddrV4, SocketAddrV4),
    /// The smoltcp socket; `None` until the host connect succeeded.
    pub handle: Option<SocketHandle>,
    pub peer: Peer,
    pub host_readable: bool,
    pub host_writable: bool,
    host_eof: bool,
    host_write_closed: bool,
}

/// What the stack must do after pumping a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Pumped {
    Keep,
    /// Both sides are finished (or one reset): remove the connection.
    Done,
}

impl TcpConn {
    pub fn host(
        tuple: (SocketAddrV4, SocketAddrV4),
        stream: TcpStream,
        syn: Option<Vec<u8>>,
    ) -> TcpConn {
        let connected = syn.is_none();
        TcpConn {
            tuple,
            handle: None,
            peer: Peer::Host {
                stream,
                connected,
                syn,
                since: Instant::now(),
            },
            host_readable: connected,
            host_writable: connected,
            host_eof: false,
            host_write_closed: false,
        }
    }

    pub fn dns(tuple: (SocketAddrV4, SocketAddrV4)) -> TcpConn {
        TcpConn {
            tuple,
            handle: None,
            peer: Peer::Dns {
                inbuf: Vec::new(),
                outbuf: Vec::new(),
                in_flight: 0,
            },
            host_readable: false,
            host_writable: true,
            host_eof: false,
            host_write_closed: false,
        }
    }

    /// Moves data both ways as far as buffers allow. DNS queries that became complete are
    /// appended to `queries`.
    pub fn pump(&mut self, sock: &mut Socket, queries: &mut Vec<Vec<u8>>) -> Pumped {
        match sock.state() {
            State::Closed | State::TimeWait => return Pumped::Done,
            State::Listen | State::SynReceived | State::SynSent => return Pumped::Keep,
            _ => {}
        }
        match &mut self.peer {
            Peer::Host { stream, .. } => {
                if pump_guest_to_host(
                    sock,
                    stream,
                    &mut self.host_writable,
                    &mut self.host_write_closed,
                )
                .is_err()
                {
                    // The reset goes out at the next poll; the socket is removed after that.
                    sock.abort();
                    return Pumped::Keep;
                }
                if !self.host_eof && self.host_readable {
                    match pump_host_to_guest(sock, stream, &mut self.host_readable) {
                        Ok(true) => {
                            self.host_eof = true;
                            sock.close();
                        }
                        Ok(false) => {}
                        Err(_) => {
                            sock.abort();
                            return Pumped::Keep;
                        }
                    }
                }
                if self.host_eof && self.host_write_closed && !sock.is_open() {
                    return Pumped::Done;
                }
                Pumped::Keep
            }
            Peer::Dns {
                inbuf,
                outbuf,
                in_flight,
            } => {
                while sock.can_recv() && inbuf.len() < 65536 + 2 {
                    let _ = sock.recv(|data| {
                        inbuf.extend_from_slice(data);
                        (data.len(), ())
                    });
                }
                while inbuf.len() >= 2 {
                    let len = usize::from(u16::from_be_bytes([inbuf[0], inbuf[1]]));
                    if inbuf.len() < 2 + len {
                        break;
                    }
                    queries.push(inbuf[2..2 + len].to_vec());
                    inbuf.drain(..2 + len);
                    *in_flight += 1;
                }
                if !outbuf.is_empty() && sock.can_send() {
                    if let Ok(n) = sock.send_slice(outbuf) {
                        outbuf.drain(..n);
                    }
                }
                if !sock.may_recv() && *in_flight == 0 && outbuf.is_empty() {
                    sock.close();
                }
                Pumped::Keep
            }
        }
    }

    /// Both directions ended with a FIN (not a reset or an abandoned connection).
    pub fn closed_gracefully(&self) -> bool {
        self.host_eof && self.host_write_closed
    }

    /// Queues a DNS reply (DNS peers only).
    pub fn push_dns_reply(&mut self, reply: &[u8]) {
        if let Peer::Dns {
            outbuf, in_flight, ..
        } = &mut self.peer
        {
            *in_flight = in_flight.saturating_sub(1);
            outbuf.extend_from_slice(&(reply.len() as u16).to_be_bytes());
            outbuf.extend_from_slice(reply);
        }
    }
}

/// Writes what the guest sent to the host; shuts the host's write side after the guest's FIN.
fn pump_guest_to_host(
    sock: &mut Socket,
    stream: &mut TcpStream,
    writable: &mut bool,
    write_closed: &mut bool,
) -> io::Result<()> {
    while *writable && sock.can_recv() {
        let r = sock.recv(|data| match stream.write(data) {
            Ok(n) => (n, Ok(n)),
            Err(e) => (0, Err(e)),
        });
        match r {
            Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => *writable = false,
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => break,
        }
    }
    if !*write_closed && !sock.may_recv() && !sock.can_recv() {
        *write_closed = true;
        let _ = stream.shutdown(Shutdown::Write);
    }
    Ok(())
}

/// Reads what the host sent into the guest socket. `Ok(true)` at the host's EOF.
fn pump_host_to_guest(
    sock: &mut Socket,
    stream: &mut TcpStream,
    readable: &mut bool,
) -> io::Result<bool> {
    while *readable && sock.can_send() {
        let r = sock.send(|buf| match stream.read(buf) {
            Ok(n) => (n, Ok(n)),
            Err(e) => (0, Err(e)),
        });
        match r {
            Ok(Ok(0)) => return Ok(true),
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => *readable = false,
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => break,
        }
    }
    Ok(false)
}
