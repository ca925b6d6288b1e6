//! A TCP proxy between the workers and a server backend, whose
//! connections the suite cuts.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The proxy: it listens on a free loopback port and forwards each
/// connection to the backend.
#[derive(Debug)]
pub(crate) struct Proxy {
    port: u16,
    /// Bumped to cut every open connection; carries the end of a
    /// blackout during which new connections are closed at once.
    cut: watch::Sender<Instant>,
    open: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts forwarding a free port to `upstream` (`host:port`).
    pub(crate) async fn start(upstream: String) -> Result<Proxy, String> {
        let listener = TcpListener::bind("127.0.0.1:0").await.map_err(|e| format!("the proxy cannot listen: {e}"))?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let (cut, cuts) = watch::channel(Instant::now());
        let open = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(serve(listener, upstream, cuts, Arc::clone(&open)));
        Ok(Proxy { port, cut, open, task })
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// Closes every open connection, and new ones for `blackout`; returns
    /// how many were open.
    pub(crate) fn cut(&self, blackout: Duration) -> usize {
        let open = self.open.load(Ordering::Relaxed);
        self.cut.send_replace(Instant::now() + blackout);
        open
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut.send_replace(Instant::now());
    }
}

async fn serve(listener: TcpListener, upstream: String, cuts: watch::Receiver<Instant>, open: Arc<AtomicUsize>) {
    loop {
        let Ok((mut client, _)) = listener.accept().await else { continue };
        if *cuts.borrow() > Instant::now() {
            continue; // in a blackout: dropped at once
        }
        let mut cuts = cuts.clone();
        cuts.mark_unchanged();
        let upstream = upstream.clone();
        let open = Arc::clone(&open);
        tokio::spawn(async move {
            let Ok(mut server) = TcpStream::connect(&upstream).await else { return };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            open.fetch_add(1, Ordering::Relaxed);
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                _ = cuts.changed() => {}
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}
