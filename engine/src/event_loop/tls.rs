//! TLS 1.3 with mutual certificates: configuration (one CA, our certificate and key, an allow
//! list), and the per-connection session the transport drives sans-IO: ciphertext read from the
//! socket goes in through `read_tls` and `process_new_packets`, plaintext for the protocol core
//! comes out of `reader`; the core's frames go in through `writer` and leave as records through
//! `write_tls`. The protocol core never sees any of it.
//!
//! The crypto provider is *ring*: it builds from crates.io with a C compiler alone (no cmake,
//! no assembler toolchain), which keeps CI's clean build short on two cores, and its AES-GCM
//! uses AES-NI with VAES/VPCLMULQDQ (AVX2) where the CPU has them.

use super::peer::{glob_match, CertIdentity, PeerIdentity};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName,
    Error as RustlsError, RootCertStore, ServerConfig, SignatureScheme,
};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why TLS could not be set up.
#[derive(Debug)]
pub enum TlsError {
    /// A file could not be read.
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A file held no usable PEM certificate or key.
    Pem { path: PathBuf, message: String },
    /// rustls refused the material (a key that does not match its certificate, a bad CA).
    Config(String),
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Read { path, error } => write!(f, "cannot read {}: {error}", path.display()),
            TlsError::Pem { path, message } => write!(f, "{}: {message}", path.display()),
            TlsError::Config(m) => write!(f, "TLS configuration: {m}"),
        }
    }
}

impl std::error::Error for TlsError {}

/// Which client certificates a server admits once they chained to the CA: a certificate
/// passes if any pattern matches its subject DN or any of its alternative names. Empty admits
/// every certificate the CA signed.
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    /// Globs on the subject DN (`O=volstream,CN=backup-*`).
    pub subjects: Vec<String>,
    /// Globs on subject alternative names (`*.backup.example`).
    pub alt_names: Vec<String>,
}

impl AllowList {
    pub fn permits(&self, id: &CertIdentity) -> bool {
        if self.subjects.is_empty() && self.alt_names.is_empty() {
            return true;
        }
        self.subjects.iter().any(|p| glob_match(p, &id.subject))
            || self
                .alt_names
                .iter()
                .any(|p| id.alt_names.iter().any(|n| glob_match(p, n)))
    }
}

/// PEM-encoded credentials: the CA that signs both sides, and this side's certificate chain
/// and key. A client without a certificate may still connect to servers that do not ask.
#[derive(Clone)]
pub struct Credentials {
    pub ca: Vec<CertificateDer<'static>>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: Option<Arc<PrivateKeyDer<'static>>>,
}

impl Credentials {
    /// Reads a CA bundle, and optionally a certificate chain and its key, from PEM files.
    pub fn from_files(ca: &Path, cert_and_key: Option<(&Path, &Path)>) -> Result<Self, TlsError> {
        let ca = read_certs(ca)?;
        let (chain, key) = match cert_and_key {
            Some((cert, key)) => (read_certs(cert)?, Some(Arc::new(read_key(key)?))),
            None => (Vec::new(), None),
        };
        Ok(Credentials { ca, chain, key })
    }

    /// From PEM text already in memory (tests, embedders with their own key store).
    pub fn from_pem(ca: &str, cert_and_key: Option<(&str, &str)>) -> Result<Self, TlsError> {
        let path = PathBuf::from("<memory>");
        let ca = parse_certs(ca.as_bytes(), &path)?;
        let (chain, key) = match cert_and_key {
            Some((cert, key)) => (
                parse_certs(cert.as_bytes(), &path)?,
                Some(Arc::new(
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| TlsError::Pem {
                        path: path.clone(),
                        message: format!("no private key: {e}"),
                    })?,
                )),
            ),
            None => (Vec::new(), None),
        };
        Ok(Credentials { ca, chain, key })
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|error| TlsError::Read {
        path: path.to_owned(),
        error,
    })?;
    parse_certs(&pem, path)
}

fn parse_certs(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            message: format!("bad certificate: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            message: "no certificate in the file".into(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = std::fs::read(path).map_err(|error| TlsError::Read {
        path: path.to_owned(),
        error,
    })?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        path: path.to_owned(),
        message: format!("no private key: {e}"),
    })
}

/// The crypto every connection uses. AES-128-GCM is offered first: on CPUs with AES-NI it is
/// the fastest suite (10 AES rounds to AES-256's 14) at a security margin nobody disputes;
/// ChaCha20-Poly1305 stays for peers without AES hardware.
fn provider() -> Arc<CryptoProvider> {
    let mut p = ring::default_provider();
    p.cipher_suites = vec![
        ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
        ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// TLS settings shared by every connection of an engine: built once, from keys read once.
#[derive(Clone)]
pub struct TlsConfig {
    pub(crate) server: Option<Arc<ServerConfig>>,
    pub(crate) client: Arc<ClientConfig>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("serves", &self.server.is_some())
            .finish()
    }
}

impl TlsConfig {
    /// Client and (with a certificate and key) server configuration from one set of
    /// credentials. Only TLS 1.3 is spoken. A server requires a client certificate chained to
    /// `credentials.ca` and admitted by `allow`; a client verifies the server's certificate
    /// against the same CA and the name it connected to.
    pub fn new(credentials: &Credentials, allow: AllowList) -> Result<TlsConfig, TlsError> {
        let provider = provider();
        let mut roots = RootCertStore::empty();
        for ca in &credentials.ca {
            roots
                .add(ca.clone())
                .map_err(|e| TlsError::Config(format!("bad CA certificate: {e}")))?;
        }
        let roots = Arc::new(roots);
        let config_error = |e: RustlsError| TlsError::Config(e.to_string());

        let server_verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
        let client = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_error)?
            .with_webpki_verifier(server_verifier);
        let client = match &credentials.key {
            Some(key) => client
                .with_client_auth_cert(credentials.chain.clone(), key.clone_key())
                .map_err(config_error)?,
            None => client.with_no_client_auth(),
        };

        let server = match &credentials.key {
            Some(key) => {
                let inner = WebPkiClientVerifier::builder_with_provider(
                    Arc::clone(&roots),
                    Arc::clone(&provider),
                )
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
                let verifier = Arc::new(AllowListVerifier { inner, allow });
                let config = ServerConfig::builder_with_provider(Arc::clone(&provider))
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .map_err(config_error)?
                    .with_client_cert_verifier(verifier)
                    .with_single_cert(credentials.chain.clone(), key.clone_key())
                    .map_err(config_error)?;
                Some(Arc::new(config))
            }
            None => None,
        };
        Ok(TlsConfig {
            server,
            client: Arc::new(client),
        })
    }

    /// Whether this configuration can serve (it has a certificate and key).
    pub fn can_serve(&self) -> bool {
        self.server.is_some()
    }
}

/// The CA's verdict, then the allow list's: a refused subject gets the `access_denied` alert
/// and a log line naming it.
#[derive(Debug)]
struct AllowListVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allow: AllowList,
}

impl ClientCertVerifier for AllowListVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, RustlsError> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|e| log::warn!("refusing a client certificate: {e}"))?;
        let id = cert_identity(end_entity).ok_or(RustlsError::InvalidCertificate(
            CertificateError::BadEncoding,
        ))?;
        if !self.allow.permits(&id) {
            log::warn!(
                "refusing client {:?}: subject not in the allow list",
                id.subject
            );
            return Err(RustlsError::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RustlsError> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RustlsError> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The subject and alternative names of a certificate (already verified by webpki, so this
/// only reads what a trusted CA signed).
pub fn cert_identity(der: &CertificateDer<'_>) -> Option<CertIdentity> {
    use x509_parser::extensions::GeneralName;
    use x509_parser::objects::{oid2abbrev, oid_registry};
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let mut parts = Vec::new();
    for rdn in cert.subject().iter() {
        for attr in rdn.iter() {
            let oid = attr.attr_type();
            let key = oid2abbrev(oid, oid_registry())
                .map(str::to_owned)
                .unwrap_or_else(|_| oid.to_id_string());
            let value = attr.as_str().unwrap_or("?");
            parts.push(format!("{key}={value}"));
        }
    }
    let mut alt_names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(n) | GeneralName::RFC822Name(n) | GeneralName::URI(n) => {
                    alt_names.push((*n).to_owned())
                }
                GeneralName::IPAddress(b) => match b.len() {
                    4 => {
                        alt_names.push(std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string())
                    }
                    16 => {
                        let mut a = [0u8; 16];
                        a.copy_from_slice(b);
                        alt_names.push(std::net::Ipv6Addr::from(a).to_string())
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }
    Some(CertIdentity {
        subject: parts.join(","),
        alt_names,
    })
}

/// A one-line explanation of a TLS failure for the person running either side.
pub fn describe(error: &RustlsError) -> String {
    use AlertDescription as A;
    use CertificateError as C;
    let text = match error {
        RustlsError::AlertReceived(A::CertificateRequired) => {
            "the server requires a client certificate (give --tls-cert and --tls-key)".to_owned()
        }
        RustlsError::AlertReceived(A::UnknownCA) => {
            "the peer does not trust our certificate (signed by a CA it does not know)".to_owned()
        }
        // What a verifier answers for a certificate whose issuer it knows by name but whose
        // signature does not verify: another CA of the same name.
        RustlsError::AlertReceived(A::DecryptError) => {
            "the peer does not trust our certificate (its signature does not verify against the peer's CA)".to_owned()
        }
        RustlsError::AlertReceived(A::CertificateExpired) => {
            "the peer refused our certificate: it has expired".to_owned()
        }
        RustlsError::AlertReceived(A::AccessDenied) => {
            "the server refused our certificate: its subject is not in the allow list".to_owned()
        }
        RustlsError::AlertReceived(A::BadCertificate) => {
            "the peer refused our certificate (bad certificate)".to_owned()
        }
        RustlsError::AlertReceived(a) => format!("the peer ended the handshake: {a:?}"),
        RustlsError::NoCertificatesPresented => "the peer sent no certificate".to_owned(),
        RustlsError::InvalidCertificate(c) => match c {
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                format!("the server's certificate is not valid for the name we connected to ({error})")
            }
            C::UnknownIssuer | C::BadSignature => {
                "the peer's certificate is not signed by our CA".to_owned()
            }
            C::Expired | C::ExpiredContext { .. } => format!("the peer's certificate has expired ({error})"),
            C::ApplicationVerificationFailure => {
                "the peer's certificate subject is not in the allow list".to_owned()
            }
            _ => format!("bad peer certificate: {error}"),
        },
        RustlsError::InvalidMessage(_)
        | RustlsError::InappropriateMessage { .. }
        | RustlsError::InappropriateHandshakeMessage { .. } => {
            format!("the peer does not speak TLS 1.3 (a plain volstream peer?): {error}")
        }
        RustlsError::PeerIncompatible(_) => format!("no common TLS parameters: {error}"),
        other => other.to_string(),
    };
    format!("TLS: {text}")
}

/// Whether bytes that should start a volstream Hello look like a TLS record instead (a
/// handshake or alert record of TLS 1.0-1.3): a plain peer meeting a TLS one.
pub fn looks_like_tls(first: &[u8]) -> bool {
    matches!(first, [0x15 | 0x16, 0x03, 0x00..=0x04, ..])
}

/// The peer identity a finished handshake proved, if the peer sent a certificate.
pub(crate) fn session_identity(conn: &rustls::Connection) -> Option<PeerIdentity> {
    let cert = conn.peer_certificates()?.first()?;
    cert_identity(cert).map(PeerIdentity::Certificate)
}

/// What the server side of the TLS transport made of a peer's bytes (see [`drive_server`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerOutcome {
    /// The input ended; this much plaintext had been delivered to the protocol core.
    Ended { plaintext: usize },
    /// TLS failed, with the reason the driver would log.
    Failed(String),
}

/// Feeds `input`, then the end of the stream, to the server side of the real TLS transport
/// over a socket pair, as the loop would (read until it would block, flush after each read).
/// For fuzzing and property tests: whatever the bytes, this must return, not panic, and hand
/// the core no plaintext a peer did not authenticate. `input` beyond 64 KiB is ignored, so the
/// socket pair's buffer holds it all.
pub fn drive_server(config: &TlsConfig, input: &[u8]) -> ServerOutcome {
    use std::io::Write;
    let Some(server) = &config.server else {
        return ServerOutcome::Failed("configuration cannot serve".into());
    };
    let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    ours.set_nonblocking(true).expect("nonblocking");
    let input = &input[..input.len().min(64 * 1024)];
    theirs
        .write_all(input)
        .expect("input fits the socket buffer");
    let _ = theirs.shutdown(std::net::Shutdown::Write);
    let conn = rustls::ServerConnection::new(Arc::clone(server)).expect("server session");
    let socket = super::Socket::Unix(mio::net::UnixStream::from_std(ours));
    let mut transport = super::Transport::tls(socket, conn.into());
    let mut buf = bytes::BytesMut::new();
    let mut plaintext = 0;
    loop {
        let read = transport.read_into(&mut buf, 64 * 1024);
        // Answers (server hello, alerts) go out whether or not the read failed.
        let _ = transport.flush();
        match read {
            Ok(0) => return ServerOutcome::Ended { plaintext },
            Ok(n) => {
                plaintext += n;
                buf.clear();
            }
            Err(e) => {
                return match super::transport::TlsFailure::of(&e) {
                    Some(m) => ServerOutcome::Failed(m.to_owned()),
                    None if e.kind() == std::io::ErrorKind::WouldBlock => {
                        ServerOutcome::Failed("socket would block after its end".into())
                    }
                    None => ServerOutcome::Failed(e.to_string()),
                }
            }
        }
    }
}
