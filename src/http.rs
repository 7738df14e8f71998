//! Small pieces both servers' clients share: the ureq agent settings, the TLS trust roots, URL
//! encoding, basic auth and reconnect backoff.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Which certificates https:// and wss:// trust: the bundled web PKI roots (the default), or the
/// certificates of the configured PEM files. Cheap to clone; built once at start-up.
#[derive(Clone, Default)]
pub struct Tls {
    custom: Option<CustomRoots>,
}

#[derive(Clone)]
struct CustomRoots {
    /// The same certificates twice: ureq takes its own type, tungstenite a rustls config.
    for_ureq: Arc<Vec<ureq::tls::Certificate<'static>>>,
    for_websocket: Arc<rustls::ClientConfig>,
}

impl Tls {
    /// Trust exactly the certificates in `ca_files`; no files means the bundled web PKI roots.
    pub fn from_files(ca_files: &[PathBuf]) -> Result<Tls, String> {
        if ca_files.is_empty() {
            return Ok(Tls::default());
        }
        let mut certificates = Vec::new();
        for path in ca_files {
            certificates.extend(read_ca_file(path)?);
        }
        // A system bundle named by SSL_CERT_FILE can hold a certificate rustls cannot use as a
        // root; skip those as OpenSSL would, and fail only when none is usable.
        let mut roots = rustls::RootCertStore::empty();
        let (usable, _skipped) = roots.add_parsable_certificates(certificates.iter().cloned());
        if usable == 0 {
            return Err(
                "no certificate in the CA files is usable as a trust root; use the PEM file of \
                 the CA that signed the server's certificate"
                    .to_string(),
            );
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let for_websocket = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("cannot set up TLS: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let for_ureq = certificates
            .iter()
            .map(|der| ureq::tls::Certificate::from_der(der.as_ref()).to_owned())
            .collect();
        Ok(Tls {
            custom: Some(CustomRoots {
                for_ureq: Arc::new(for_ureq),
                for_websocket: Arc::new(for_websocket),
            }),
        })
    }

    /// The connector for `tungstenite::client_tls_with_config`; `None` means its web PKI default.
    pub fn websocket_connector(&self) -> Option<tungstenite::Connector> {
        self.custom
            .as_ref()
            .map(|custom| tungstenite::Connector::Rustls(custom.for_websocket.clone()))
    }

    fn ureq_config(&self) -> ureq::tls::TlsConfig {
        let roots = match &self.custom {
            Some(custom) => ureq::tls::RootCerts::Specific(custom.for_ureq.clone()),
            None => ureq::tls::RootCerts::WebPki,
        };
        ureq::tls::TlsConfig::builder().root_certs(roots).build()
    }
}

/// Reads the certificates of a PEM file. The problem names the path and the fix.
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let shown = path.display();
    let bytes = std::fs::read(path)
        .map_err(|e| format!("cannot read {shown}: {e}; check the path and its permissions"))?;
    let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            format!("{shown} is not a valid PEM file ({e}); use the CA certificate in PEM form")
        })?;
    if certificates.is_empty() {
        return Err(format!(
            "{shown} holds no certificate; use a PEM file with -----BEGIN CERTIFICATE----- blocks"
        ));
    }
    Ok(certificates)
}

/// What to do about a TLS failure, to append to its message; `None` when `error` is not about TLS.
pub fn tls_hint(error: &str) -> Option<&'static str> {
    let lower = error.to_ascii_lowercase();
    if lower.contains("unknownissuer") || lower.contains("unknown issuer") {
        Some(
            "the server's certificate is not signed by a trusted CA; if it uses a private CA, set \
             OPENCODE_MM_CA_FILE to that CA's PEM file",
        )
    } else if lower.contains("certificate") || lower.contains("tls") {
        Some(
            "the TLS handshake failed; check that the URL's host name matches the server's \
             certificate and that the certificate has not expired",
        )
    } else {
        None
    }
}

/// Each pooled connection's input and output buffer. ureq's default, 128 KiB each, sits at
/// glibc's mmap threshold: after the first such buffer is freed, later ones come from the malloc
/// arenas, and 50 sessions finishing at once left ~8 MiB resident there (`make bench`). Our
/// requests and response headers are a few KiB; bodies stream through in pieces.
const CONNECTION_BUFFER_BYTES: usize = 16 * 1024;

/// An agent that hands every status back to the caller, so JSON error bodies reach the message the
/// user sees, and that keeps connections alive between calls.
pub fn agent(call_timeout: Duration) -> ureq::Agent {
    agent_with_tls(call_timeout, &Tls::default())
}

/// `agent`, trusting `tls`'s roots for https://.
pub fn agent_with_tls(call_timeout: Duration, tls: &Tls) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(5)))
        .timeout_global(Some(call_timeout))
        .tls_config(tls.ureq_config())
        .input_buffer_size(CONNECTION_BUFFER_BYTES)
        .output_buffer_size(CONNECTION_BUFFER_BYTES)
        .user_agent(concat!("opencode-mattermost/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

/// An agent for long-lived streams: no overall deadline, but a body read that stays silent for
/// `idle` fails, which is how a dead stream is noticed. `timeout_per_read` restarts with every read;
/// `timeout_recv_body` would instead cut a healthy stream `idle` after its headers.
pub fn stream_agent(idle: Duration) -> ureq::Agent {
    stream_agent_with_tls(idle, &Tls::default())
}

/// `stream_agent`, trusting `tls`'s roots for https://.
pub fn stream_agent_with_tls(idle: Duration, tls: &Tls) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(5)))
        .timeout_recv_response(Some(idle))
        .timeout_per_read(Some(idle))
        .tls_config(tls.ureq_config())
        .input_buffer_size(CONNECTION_BUFFER_BYTES)
        .output_buffer_size(CONNECTION_BUFFER_BYTES)
        .user_agent(concat!("opencode-mattermost/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

/// Everything but RFC 3986's unreserved characters, less `.`: in a path segment, `.` and `..` are dot
/// segments that a client, proxy or server resolves away.
const ENCODED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'~');

/// Encodes `text` (an id from a server, a directory, a file name) as one URL path segment or one query
/// value: `/`, `?`, `#`, `%`, `&`, `=`, `.` and every non-ASCII byte are escaped, so the text can
/// neither add path segments, climb with `..`, nor end the path or the value.
pub fn percent_encode(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, ENCODED).to_string()
}

pub fn basic_auth(username: &str, password: &str) -> String {
    use base64::Engine as _;
    let credentials = format!("{username}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(credentials)
    )
}

/// Exponential backoff with jitter, from `base` up to `cap`, forever.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The next delay: full exponential step, then a random 50–100% of it so that many clients
    /// restarting together do not retry in lockstep.
    pub fn next_delay(&mut self) -> Duration {
        let step = self
            .base
            .saturating_mul(1 << self.attempt.min(16))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let jitter = 0.5 + 0.5 * random_unit();
        step.mul_f64(jitter)
    }
}

/// A number in [0, 1) that differs between calls and processes; good enough for jitter.
fn random_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// Serves one chunked response that sends a chunk every `gap`, `chunks` times, then goes silent.
    fn trickle_server(gap: Duration, chunks: usize) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}/", listener.local_addr().expect("address"));
        std::thread::spawn(move || {
            let Ok((mut stream, _)) = listener.accept() else {
                return;
            };
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request);
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n");
            for _ in 0..chunks {
                let _ = stream.write_all(b"2\r\nok\r\n");
                std::thread::sleep(gap);
            }
            std::thread::sleep(Duration::from_secs(30));
        });
        url
    }

    #[test]
    fn a_stream_that_keeps_talking_outlives_its_idle_timeout_and_a_silent_one_does_not() {
        // Chunks every 100 ms for 3 s against a 1 s idle timeout: the stream must stay up.
        let idle = Duration::from_secs(1);
        let url = trickle_server(Duration::from_millis(100), 30);
        let response = stream_agent(idle).get(&url).call().expect("response");
        let mut body = response.into_body().into_reader();
        let mut received = 0;
        let mut buffer = [0u8; 64];
        let outcome = loop {
            match body.read(&mut buffer) {
                Ok(0) => break Ok(()),
                Ok(n) => received += n,
                Err(e) => break Err(e),
            }
        };
        assert_eq!(
            received, 60,
            "every chunk arrived before the stream went silent"
        );
        // Then it went silent, and only the idle timeout ended the read.
        assert!(outcome.is_err());
    }

    #[test]
    fn basic_auth_matches_rfc_7617_example() {
        assert_eq!(
            basic_auth("Aladdin", "open sesame"),
            "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
    }

    #[test]
    fn percent_encoding_makes_one_segment_of_anything() {
        let check = |text: &str, expected: &str| assert_eq!(percent_encode(text), expected);
        check("abcXYZ019-_~", "abcXYZ019-_~");
        check("a/b", "a%2Fb");
        check(".", "%2E");
        check("..", "%2E%2E");
        check("../../users/me", "%2E%2E%2F%2E%2E%2Fusers%2Fme");
        check("100%", "100%25");
        check("%2F", "%252F");
        check("a?b=c", "a%3Fb%3Dc");
        check("a#frag", "a%23frag");
        check("a&b=c", "a%26b%3Dc");
        check("a b+c", "a%20b%2Bc");
        check("/home/ü 日", "%2Fhome%2F%C3%BC%20%E6%97%A5");
        check("", "");
    }

    #[test]
    fn backoff_grows_to_its_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let delays: Vec<Duration> = (0..8).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(500) && delays[0] <= Duration::from_secs(1));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(30)));
        assert!(delays[7] >= Duration::from_secs(15));
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_secs(1));
    }
}
