//! TLS options of every command, and `certs`: a CA and certificates for a test setup.
//!
//! Default locations follow libvirt's pki layout (`/etc/pki/CA/cacert.pem`,
//! `/etc/pki/volstream/{server,client}cert.pem`, `/etc/pki/volstream/private/*key.pem`), so a
//! host set up for libvirt's TLS needs only its files copied under volstream's name.

use crate::error::CliError;
use clap::Args;
use engine::{Address, AllowList, Credentials, EngineConfig, TlsConfig};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

const DEFAULT_CA: &str = "/etc/pki/CA/cacert.pem";

/// Which end of a connection loads the credentials (their default file names differ).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

/// `--tls-ca`, `--tls-cert`, `--tls-key`: read once, at start, for `tls:` addresses only.
#[derive(Args, Clone, Default)]
pub struct TlsArgs {
    /// CA certificate(s) that sign both ends [default: /etc/pki/CA/cacert.pem]
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// This side's certificate chain [default: /etc/pki/volstream/{server,client}cert.pem]
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// This side's private key [default: /etc/pki/volstream/private/{server,client}key.pem]
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
}

impl TlsArgs {
    /// Adds TLS settings to `config` when `addr` asks for TLS. A client without a certificate
    /// (none given and none at the default place) connects without one; servers that require
    /// one then refuse it with a clear reason.
    pub fn apply(
        &self,
        addr: &Address,
        role: Role,
        allow: AllowList,
        config: &mut EngineConfig,
    ) -> Result<(), CliError> {
        if !matches!(addr, Address::Tls { .. }) {
            if self.tls_ca.is_some() || self.tls_cert.is_some() || self.tls_key.is_some() {
                return Err(CliError::Usage(format!(
                    "--tls-* options need a tls:HOST:PORT address, not {addr}"
                )));
            }
            return Ok(());
        }
        let stem = match role {
            Role::Server => "server",
            Role::Client => "client",
        };
        let ca = self
            .tls_ca
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CA));
        let given = self.tls_cert.is_some() || self.tls_key.is_some();
        let cert = self
            .tls_cert
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/etc/pki/volstream/{stem}cert.pem")));
        let key = self
            .tls_key
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/etc/pki/volstream/private/{stem}key.pem")));
        let have_pair = given || role == Role::Server || (cert.exists() && key.exists());
        if have_pair {
            warn_if_readable(&key);
        }
        let pair = have_pair.then_some((cert.as_path(), key.as_path()));
        let credentials =
            Credentials::from_files(&ca, pair).map_err(|e| CliError::Usage(e.to_string()))?;
        let tls =
            TlsConfig::new(&credentials, allow).map_err(|e| CliError::Usage(e.to_string()))?;
        config.tls = Some(tls);
        Ok(())
    }
}

/// A private key others can read is no longer private: say so (and go on, like ssh-keygen's
/// users expect a warning rather than a refusal on a test box).
fn warn_if_readable(key: &Path) {
    if let Ok(meta) = std::fs::metadata(key) {
        if meta.permissions().mode() & 0o077 != 0 {
            eprintln!(
                "volstream: warning: private key {} is accessible by group or others (chmod 600 it)",
                key.display()
            );
        }
    }
}

#[derive(Args)]
pub struct CertsArgs {
    /// Directory for the files (created if missing). A CA already there (cacert.pem and
    /// cakey.pem) signs the new certificates; otherwise a new CA is made.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// A server certificate (servercert.pem, serverkey.pem) for these host names or IP
    /// addresses (repeatable; the first is also its CN).
    #[arg(long = "server", value_name = "NAME")]
    servers: Vec<String>,
    /// A client certificate with this CN: CN.pem and CN-key.pem (repeatable).
    #[arg(long = "client", value_name = "CN")]
    clients: Vec<String>,
    /// Organization (O) of every subject.
    #[arg(long, default_value = "volstream")]
    organization: String,
    /// Days the certificates are valid.
    #[arg(long, default_value_t = 365)]
    days: u32,
}

/// `volstream certs`: a CA and certificates for trying TLS between hosts. Not a PKI: keys are
/// written unencrypted (mode 0600) and nothing is revoked.
pub fn certs(args: CertsArgs) -> Result<(), CliError> {
    if args.days == 0 {
        return Err(CliError::Usage("--days must be at least 1".into()));
    }
    let fail = |what: &str, e: &dyn std::fmt::Display| CliError::Other(format!("{what}: {e}"));
    std::fs::create_dir_all(&args.dir)
        .map_err(|e| fail(&format!("cannot create {}", args.dir.display()), &e))?;
    let (ca_cert, ca_key) = (args.dir.join("cacert.pem"), args.dir.join("cakey.pem"));
    let issuer = if ca_cert.exists() && ca_key.exists() {
        let key = read(&ca_key)?;
        let key = KeyPair::from_pem(&key).map_err(|e| fail(&ca_key.display().to_string(), &e))?;
        let cert = read(&ca_cert)?;
        println!("using the CA in {}", ca_cert.display());
        Issuer::from_ca_cert_pem(&cert, key)
            .map_err(|e| fail(&ca_cert.display().to_string(), &e))?
    } else {
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(|e| fail("CA parameters", &e))?;
        params.distinguished_name = subject(&args.organization, "volstream CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params, args.days.max(3650));
        let key = KeyPair::generate().map_err(|e| fail("CA key", &e))?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| fail("CA certificate", &e))?;
        write(&ca_key, &key.serialize_pem(), true)?;
        write(&ca_cert, &cert.pem(), false)?;
        println!("wrote {} and {}", ca_cert.display(), ca_key.display());
        Issuer::new(params, key)
    };
    let leaf = |cn: &str, sans: &[String], usage, cert: PathBuf, key: PathBuf| {
        let mut params = CertificateParams::new(sans.to_vec())
            .map_err(|e| fail(&format!("names {sans:?}"), &e))?;
        params.distinguished_name = subject(&args.organization, cn);
        params.extended_key_usages = vec![usage];
        validity(&mut params, args.days);
        let pair = KeyPair::generate().map_err(|e| fail("key", &e))?;
        let signed = params
            .signed_by(&pair, &issuer)
            .map_err(|e| fail("certificate", &e))?;
        write(&key, &pair.serialize_pem(), true)?;
        write(&cert, &signed.pem(), false)?;
        println!(
            "wrote {} (O={},CN={cn}) and {}",
            cert.display(),
            args.organization,
            key.display()
        );
        Ok::<(), CliError>(())
    };
    if let Some(first) = args.servers.first() {
        leaf(
            first,
            &args.servers,
            ExtendedKeyUsagePurpose::ServerAuth,
            args.dir.join("servercert.pem"),
            args.dir.join("serverkey.pem"),
        )?;
    }
    for cn in &args.clients {
        if cn.is_empty() || cn.contains('/') {
            return Err(CliError::Usage(format!(
                "--client {cn:?}: a CN must be a non-empty file-name-safe string"
            )));
        }
        leaf(
            cn,
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
            args.dir.join(format!("{cn}.pem")),
            args.dir.join(format!("{cn}-key.pem")),
        )?;
    }
    Ok(())
}

fn subject(organization: &str, cn: &str) -> rcgen::DistinguishedName {
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(DnType::OrganizationName, organization);
    dn.push(DnType::CommonName, cn);
    dn
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    // A day of slack for clocks that disagree a little.
    params.not_before = rcgen::date_time_ymd(1970, 1, 1) + time_secs(now - 86_400);
    params.not_after = rcgen::date_time_ymd(1970, 1, 1) + time_secs(now + days as i64 * 86_400);
}

fn time_secs(secs: i64) -> std::time::Duration {
    std::time::Duration::from_secs(secs.max(0) as u64)
}

fn read(path: &Path) -> Result<String, CliError> {
    std::fs::read_to_string(path)
        .map_err(|e| CliError::Other(format!("cannot read {}: {e}", path.display())))
}

/// Writes a new file; keys are created mode 0600 (never briefly readable by others).
fn write(path: &Path, text: &str, private: bool) -> Result<(), CliError> {
    let mut options = std::fs::OpenOptions::new();
    options
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 });
    options
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| CliError::Other(format!("cannot write {}: {e}", path.display())))
}
