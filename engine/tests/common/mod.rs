//! Helpers shared by the engine's integration tests: certificates, and the transports a
//! transport-independent test runs over.
#![allow(dead_code)]

use engine::{Address, AllowList, Credentials, EngineConfig, TlsConfig};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use std::sync::OnceLock;

/// A certificate authority that signs test certificates.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
#[derive(Clone)]
pub struct Leaf {
    pub cert: String,
    pub key: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "volstream tests");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    pub fn der(&self) -> Vec<u8> {
        self.issuer.der().to_vec()
    }

    /// A certificate for `cn` with alternative names `sans`, usable as server and client.
    pub fn leaf(&self, cn: &str, sans: &[&str]) -> Leaf {
        self.leaf_with(cn, sans, |_| {})
    }

    pub fn leaf_with(
        &self,
        cn: &str,
        sans: &[&str],
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> Leaf {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "volstream tests");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        adjust(&mut params);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// One CA with a server certificate for localhost and a client certificate, made once.
pub struct Pki {
    pub ca: Ca,
    pub server: Leaf,
    pub client: Leaf,
}

pub fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let ca = Ca::new("test CA");
        let server = ca.leaf("server", &["localhost", "127.0.0.1"]);
        let client = ca.leaf("client", &["client.test"]);
        Pki { ca, server, client }
    })
}

/// TLS settings from PEM text.
pub fn tls(ca: &str, leaf: Option<&Leaf>, allow: AllowList) -> TlsConfig {
    let credentials =
        Credentials::from_pem(ca, leaf.map(|l| (l.cert.as_str(), l.key.as_str()))).unwrap();
    TlsConfig::new(&credentials, allow).unwrap()
}

/// What a transport-independent test runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Net {
    Unix,
    Tls,
}

impl Net {
    /// Where a server listens (port 0: the bound address comes back from `listen`).
    pub fn listen_addr(self, tag: &str) -> Address {
        match self {
            Net::Unix => {
                let path = std::env::temp_dir()
                    .join(format!("volstream-{tag}-{}.sock", std::process::id()));
                let _ = std::fs::remove_file(&path);
                Address::Unix(path)
            }
            Net::Tls => "tls:0".parse().unwrap(),
        }
    }

    pub fn server(self, mut config: EngineConfig) -> EngineConfig {
        if self == Net::Tls {
            let p = pki();
            config.tls = Some(tls(&p.ca.pem(), Some(&p.server), AllowList::default()));
        }
        config
    }

    pub fn client(self, mut config: EngineConfig) -> EngineConfig {
        if self == Net::Tls {
            let p = pki();
            config.tls = Some(tls(&p.ca.pem(), Some(&p.client), AllowList::default()));
        }
        config
    }
}

/// Runs each named test function (taking a [`Net`]) once over a Unix socket and once over TLS.
#[macro_export]
macro_rules! over_each_transport {
    ($($name:ident),* $(,)?) => {
        mod over_unix {
            $(#[test] fn $name() { super::$name($crate::common::Net::Unix) })*
        }
        mod over_tls {
            $(#[test] fn $name() { super::$name($crate::common::Net::Tls) })*
        }
    };
}
