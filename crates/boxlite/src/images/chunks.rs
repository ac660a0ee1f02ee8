//! A byte stream handed from one thread to another in chunks, over a bounded channel: the
//! writer waits when the reader is [`chunks`]' `depth` chunks behind, so memory stays bounded.
//! The reader sees the end of the data only when the writer says so ([`ChunkSender::end`]); a
//! writer that goes away without saying it makes the reader fail, never end early.

use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

enum Chunk {
    Data(Vec<u8>),
    End,
    Failed(io::Error),
}

/// The writing end of [`chunks`].
pub struct ChunkSender {
    tx: SyncSender<Chunk>,
}

impl ChunkSender {
    /// Hands `chunk` over, waiting while the reader is behind; false when the reader is gone.
    pub fn send(&self, chunk: Vec<u8>) -> bool {
        self.tx.send(Chunk::Data(chunk)).is_ok()
    }

    /// The data is complete: the reader's next read past it returns 0.
    pub fn end(self) {
        let _ = self.tx.send(Chunk::End);
    }

    /// The data cannot be completed: the reader gets `error`.
    pub fn fail(self, error: io::Error) {
        let _ = self.tx.send(Chunk::Failed(error));
    }
}

/// The reading end of [`chunks`].
pub struct ChunkReader {
    rx: Mutex<Receiver<Chunk>>,
    chunk: Vec<u8>,
    pos: usize,
    done: bool,
    gone: &'static str,
    abandoned: Arc<AtomicBool>,
}

impl ChunkReader {
    /// Becomes true when this reader failed because the writer went away without ending or
    /// failing the data (as opposed to the reader's own consumer giving up).
    pub fn abandoned(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.abandoned)
    }
}

/// A connected pair, `depth` chunks deep. `gone` is the reader's error message for a writer
/// that went away.
pub fn chunks(depth: usize, gone: &'static str) -> (ChunkSender, ChunkReader) {
    let (tx, rx) = sync_channel(depth);
    let reader = ChunkReader {
        rx: Mutex::new(rx),
        chunk: Vec::new(),
        pos: 0,
        done: false,
        gone,
        abandoned: Arc::new(AtomicBool::new(false)),
    };
    (ChunkSender { tx }, reader)
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            if self.done || buf.is_empty() {
                return Ok(0);
            }
            match self.rx.get_mut().expect("chunk receiver").recv() {
                Ok(Chunk::Data(chunk)) => {
                    self.chunk = chunk;
                    self.pos = 0;
                }
                Ok(Chunk::End) => self.done = true,
                Ok(Chunk::Failed(error)) => return Err(error),
                Err(_) => {
                    self.abandoned.store(true, Ordering::Relaxed);
                    return Err(io::Error::other(self.gone));
                }
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_in_order_then_end_fail_or_abandon() {
        let (tx, mut rx) = chunks(2, "writer gone");
        let writer = std::thread::spawn(move || {
            for i in 0..10u8 {
                assert!(tx.send(vec![i; 3]));
            }
            tx.end();
        });
        let mut out = Vec::new();
        rx.read_to_end(&mut out).unwrap();
        writer.join().unwrap();
        assert_eq!(out, (0..10u8).flat_map(|i| [i; 3]).collect::<Vec<_>>());
        assert_eq!(rx.read(&mut [0u8; 4]).unwrap(), 0, "stays at its end");

        let (tx, mut rx) = chunks(2, "writer gone");
        tx.fail(io::Error::other("bad data"));
        assert_eq!(rx.read(&mut [0u8; 4]).unwrap_err().to_string(), "bad data");
        assert!(!rx.abandoned().load(Ordering::Relaxed));

        let (tx, mut rx) = chunks(2, "writer gone");
        assert!(tx.send(b"partial".to_vec()));
        drop(tx);
        let mut out = Vec::new();
        let err = rx.read_to_end(&mut out).unwrap_err();
        assert_eq!(
            (out.as_slice(), err.to_string().as_str()),
            (&b"partial"[..], "writer gone")
        );
        assert!(rx.abandoned().load(Ordering::Relaxed));
    }
}
