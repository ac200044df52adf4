//! A TCP proxy owned by a test, between the layer and a test-owned redis-server, that
//! injects faults: added latency, a black hole (nothing flows, both ways, until healed),
//! dropped connections and refused connections.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    Pass = 0,
    /// Replies are held back by the configured latency.
    Delay = 1,
    /// Nothing flows either way (like a partition) until the mode changes.
    BlackHole = 2,
    /// New connections are closed at once.
    Refuse = 3,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    mode: Arc<AtomicU8>,
    delay_ms: Arc<AtomicU64>,
    kill: broadcast::Sender<()>,
}

impl FaultProxy {
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(AtomicU8::new(Mode::Pass as u8));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let (kill, _) = broadcast::channel(4);
        let (m, d, k) = (mode.clone(), delay_ms.clone(), kill.clone());
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if m.load(Ordering::SeqCst) == Mode::Refuse as u8 {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, m.clone(), None, k.subscribe()));
                tokio::spawn(pump(sr, cw, m.clone(), Some(d.clone()), k.subscribe()));
            }
        });
        FaultProxy {
            addr,
            mode,
            delay_ms,
            kill,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    pub fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
        self.set(Mode::Delay);
    }

    /// Close every open connection.
    pub fn drop_connections(&self) {
        let _ = self.kill.send(());
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mode: Arc<AtomicU8>,
    delay_ms: Option<Arc<AtomicU64>>,
    mut kill: broadcast::Receiver<()>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
            _ = kill.recv() => return,
        };
        // Hold the bytes while the hole is open, then deliver them (TCP does not lose
        // data in a partition: it arrives when the network heals, or the link dies).
        while mode.load(Ordering::SeqCst) == Mode::BlackHole as u8 {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                _ = kill.recv() => return,
            }
        }
        if let Some(d) = &delay_ms
            && mode.load(Ordering::SeqCst) == Mode::Delay as u8
        {
            let ms = d.load(Ordering::SeqCst);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
                _ = kill.recv() => return,
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
