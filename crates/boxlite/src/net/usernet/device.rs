//! The smoltcp device between the stack and QEMU's stream socket: frames from the guest are
//! queued for smoltcp to read; frames smoltcp (or our own handlers) send are framed straight into
//! the output buffer that the event loop flushes to QEMU.
//!
//! When the output buffer holds more than [`BACKPRESSURE`] bytes (QEMU or the guest is slow),
//! `transmit` refuses and smoltcp keeps the data in its socket buffers: TCP then slows the host
//! peers down instead of our memory growing.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant;

use super::Counters;
use crate::net::framing;

/// Output bytes above which smoltcp may not transmit.
pub const BACKPRESSURE: usize = 1 << 20;
/// Output bytes above which even our own datagrams are dropped (UDP may lose packets).
const HARD_LIMIT: usize = 4 << 20;

#[derive(Debug)]
pub struct QueueDevice {
    pub rx: VecDeque<Vec<u8>>,
    pub out: Vec<u8>,
    counters: Arc<Counters>,
}

impl QueueDevice {
    pub fn new(counters: Arc<Counters>) -> QueueDevice {
        QueueDevice {
            rx: VecDeque::new(),
            out: Vec::new(),
            counters,
        }
    }

    /// Queues one frame for the guest; false if it was dropped for lack of room.
    pub fn send_frame(&mut self, frame: &[u8]) -> bool {
        if self.out.len() > HARD_LIMIT {
            self.counters.dropped_frames.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        push_out(&mut self.out, &self.counters, frame);
        true
    }
}

fn push_out(out: &mut Vec<u8>, counters: &Counters, frame: &[u8]) {
    framing::encode_into(out, frame);
    counters.rx_packets.fetch_add(1, Ordering::Relaxed);
    counters
        .rx_bytes
        .fetch_add(frame.len() as u64, Ordering::Relaxed);
}

pub struct Rx(Vec<u8>);

pub struct Tx<'a> {
    out: &'a mut Vec<u8>,
    counters: &'a Counters,
}

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0u8; len];
        let r = f(&mut frame);
        push_out(self.out, self.counters, &frame);
        r
    }
}

impl Device for QueueDevice {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(Rx, Tx<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((
            Rx(frame),
            Tx {
                out: &mut self.out,
                counters: &self.counters,
            },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<Tx<'_>> {
        (self.out.len() <= BACKPRESSURE).then(|| Tx {
            out: &mut self.out,
            counters: &self.counters,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        caps
    }
}
