//! A relay in front of PostgreSQL or Redis that a test can cut: while cut, every connection
//! through it is closed and new ones are refused, as in a failover or an outage of the network,
//! until it is restored. Whatever connects through it sees the errors a real outage gives (I/O
//! errors on open connections, refused connects, pool timeouts), which a trigger raising an
//! error code cannot give: reads go away too.

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::AbortHandle;

pub struct Relay {
    /// The database's connect options, for a relay to PostgreSQL.
    options: Option<PgConnectOptions>,
    port: u16,
    cut: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

/// Where the relay forwards to, over TCP or a Unix socket.
#[derive(Clone)]
enum Upstream {
    Tcp(String),
    Unix(String),
}

impl Relay {
    /// A relay to the server and database `pool` connects to, on a free loopback port.
    pub async fn to_database(pool: &PgPool) -> Self {
        let options = (*pool.connect_options()).clone();
        let host = options.get_host().to_string();
        let upstream = if host.starts_with('/') {
            Upstream::Unix(format!("{host}/.s.PGSQL.{}", options.get_port()))
        } else {
            Upstream::Tcp(format!("{host}:{}", options.get_port()))
        };
        Self::start(upstream, Some(options)).await
    }

    /// A relay to the Redis server of `url` (`redis://[user:password@]host:port[/db]`).
    pub async fn to_redis(url: &str) -> Self {
        let rest = url.strip_prefix("redis://").expect("a redis:// URL");
        let authority = rest.split('/').next().unwrap_or(rest);
        let address = authority.rsplit('@').next().unwrap_or(authority);
        Self::start(Upstream::Tcp(address.to_string()), None).await
    }

    /// The relay's address for Redis clients: `url` with the relay's host and port.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn start(upstream: Upstream, options: Option<PgConnectOptions>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let links: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let accept = tokio::spawn({
            let cut = cut.clone();
            let links = links.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    if cut.load(Ordering::SeqCst) {
                        // refused: closed at once
                        continue;
                    }
                    let upstream = upstream.clone();
                    let link = tokio::spawn(async move {
                        let mut client = client;
                        match upstream {
                            Upstream::Tcp(addr) => {
                                if let Ok(mut server) = tokio::net::TcpStream::connect(addr).await {
                                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server)
                                        .await;
                                }
                            }
                            Upstream::Unix(path) => {
                                if let Ok(mut server) = tokio::net::UnixStream::connect(path).await
                                {
                                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server)
                                        .await;
                                }
                            }
                        }
                    });
                    let mut links = links.lock().unwrap();
                    links.retain(|l| !l.is_finished());
                    links.push(link.abort_handle());
                }
            }
        });
        Self {
            options,
            port,
            cut,
            links,
            accept,
        }
    }

    /// A pool of up to `max` connections through the relay, to the same database, that gives up
    /// on a connection after `acquire_timeout` (a pool's default is 30 s).
    pub fn pool(&self, max: u32, acquire_timeout: Duration) -> PgPool {
        let options = self.options.clone().expect("a relay to a database");
        PgPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(acquire_timeout)
            .connect_lazy_with(options.host("127.0.0.1").port(self.port))
    }

    /// The outage begins: every open connection through the relay is closed and new ones are
    /// refused. Returns how many connections were open.
    pub fn cut(&self) -> usize {
        self.cut.store(true, Ordering::SeqCst);
        let mut links = self.links.lock().unwrap();
        let open = links.iter().filter(|l| !l.is_finished()).count();
        for l in links.drain(..) {
            l.abort();
        }
        open
    }

    /// The outage ends: connections are accepted again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        for l in self.links.lock().unwrap().drain(..) {
            l.abort();
        }
    }
}
