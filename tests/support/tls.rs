//! TLS in front of a plain test server: a private CA made with rcgen, and a proxy on 127.0.0.1 that
//! terminates TLS with a certificate from that CA and forwards the bytes to the server behind it.
//! Wrapping the fake Mattermost this way gives it https:// and wss:// without changing it.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A certificate authority for one test, and a server certificate it issued for 127.0.0.1 and
/// localhost.
pub struct TestCa {
    /// The CA certificate in PEM form, for OPENCODE_MM_CA_FILE.
    pub pem: String,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: Vec<u8>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
        let server_key = KeyPair::generate().expect("server key");
        let server = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .expect("server params");
        let server_cert = server
            .signed_by(&server_key, &ca_cert, &ca_key)
            .expect("server certificate");
        TestCa {
            pem: ca_cert.pem(),
            server_chain: vec![server_cert.der().clone()],
            server_key: server_key.serialize_der(),
        }
    }

    /// Writes the CA certificate to `dir/name` and returns the path.
    pub fn write_pem(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, &self.pem).expect("write CA PEM");
        path
    }

    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key.clone()));
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(self.server_chain.clone(), key)
            .expect("server certificate and key");
        Arc::new(config)
    }
}

/// Accepts TLS on 127.0.0.1 and forwards each connection to `upstream` in plain text.
pub struct TlsProxy {
    addr: SocketAddr,
    stopping: Arc<AtomicBool>,
}

impl TlsProxy {
    pub fn start(ca: &TestCa, upstream: SocketAddr) -> TlsProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("tls proxy: bind");
        let addr = listener.local_addr().expect("tls proxy: address");
        let config = ca.server_config();
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = stopping.clone();
        std::thread::Builder::new()
            .name("tls-proxy-accept".into())
            .spawn(move || {
                for client in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let Ok(client) = client else { continue };
                    let (config, stop) = (config.clone(), stop.clone());
                    let _ = std::thread::Builder::new()
                        .name("tls-proxy-conn".into())
                        .spawn(move || forward(client, upstream, config, &stop));
                }
            })
            .expect("tls proxy: spawn");
        TlsProxy { addr, stopping }
    }

    /// `https://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        // Wakes the accept loop so that it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Shuttles bytes both ways until either side closes. Short read timeouts on both sockets let one
/// thread serve both directions.
fn forward(
    client: TcpStream,
    upstream: SocketAddr,
    config: Arc<rustls::ServerConfig>,
    stop: &AtomicBool,
) {
    let Ok(mut server) = TcpStream::connect(upstream) else {
        return;
    };
    let tick = Some(Duration::from_millis(5));
    if client.set_read_timeout(tick).is_err() || server.set_read_timeout(tick).is_err() {
        return;
    }
    let Ok(connection) = rustls::ServerConnection::new(config) else {
        return;
    };
    let mut tls = rustls::StreamOwned::new(connection, client);
    let mut buffer = vec![0u8; 64 * 1024];
    let idle = |e: &std::io::Error| matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut);
    while !stop.load(Ordering::Relaxed) {
        match tls.read(&mut buffer) {
            Ok(0) => return,
            Ok(n) => {
                if server.write_all(&buffer[..n]).is_err() {
                    return;
                }
            }
            Err(e) if idle(&e) => {}
            Err(_) => return,
        }
        match server.read(&mut buffer) {
            Ok(0) => {
                tls.conn.send_close_notify();
                let _ = tls.flush();
                return;
            }
            Ok(n) => {
                if tls
                    .write_all(&buffer[..n])
                    .and_then(|()| tls.flush())
                    .is_err()
                {
                    return;
                }
            }
            Err(e) if idle(&e) => {}
            Err(_) => return,
        }
    }
}
