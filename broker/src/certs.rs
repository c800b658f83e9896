//! `umbra certs`: a development CA and the certificates signed by it, so
//! that mutual TLS can be tried in minutes: `ca.pem`/`ca.key`, a server
//! certificate for the listener, and one certificate per device whose
//! subject common name is the device's thing name (its identity).
//!
//! Keys are written readable by their owner only. This is for development
//! and tests; a fleet in production uses its own PKI.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, CertificateRevocationListParams,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair,
    KeyUsagePurpose, RevocationReason, RevokedCertParams, SerialNumber,
};
use time::{Duration, OffsetDateTime};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{0} exists already (remove it to make a new one)")]
    Exists(PathBuf),
    #[error("invalid name {0:?}")]
    Name(String),
    #[error("invalid serial number {0:?} (hex, as `umbra certs device` prints it)")]
    Serial(String),
}

/// The development CA's subject; device and server certificates name it as
/// their issuer.
const CA_NAME: &str = "Umbra development CA";

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write(path: &Path, contents: &str, private: bool) -> Result<(), CertError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(io_error(path))?;
    file.write_all(contents.as_bytes()).map_err(io_error(path))
}

fn ca_params() -> Result<CertificateParams, CertError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_NAME);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

/// Makes `ca.pem` and `ca.key` in `dir` (created if missing). Refuses to
/// replace an existing CA, whose certificates would stop verifying.
pub fn make_ca(dir: &Path) -> Result<PathBuf, CertError> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    if key_path.exists() {
        return Err(CertError::Exists(key_path));
    }
    let key = KeyPair::generate()?;
    let cert = ca_params()?.self_signed(&key)?;
    write(&key_path, &key.serialize_pem(), true)?;
    write(&cert_path, &cert.pem(), false)?;
    Ok(cert_path)
}

/// The CA in `dir`, to sign with. The issuer is named by its subject and
/// identified by its key: a CA certificate made again from the same
/// parameters and key signs for the one in ca.pem.
fn load_ca(dir: &Path) -> Result<(Certificate, KeyPair), CertError> {
    let ca_key_path = dir.join("ca.key");
    let ca_key = std::fs::read_to_string(&ca_key_path).map_err(io_error(&ca_key_path))?;
    let ca_key = KeyPair::from_pem(&ca_key)?;
    Ok((ca_params()?.self_signed(&ca_key)?, ca_key))
}

/// Signs a certificate for `params` with the CA in `dir`, writing
/// `{file}.pem` and `{file}.key`.
fn sign(dir: &Path, file: &str, params: CertificateParams) -> Result<PathBuf, CertError> {
    let (ca, ca_key) = load_ca(dir)?;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca, &ca_key)?;
    let (cert_path, key_path) = (
        dir.join(format!("{file}.pem")),
        dir.join(format!("{file}.key")),
    );
    write(&key_path, &key.serialize_pem(), true)?;
    write(&cert_path, &cert.pem(), false)?;
    Ok(cert_path)
}

/// A server certificate for `hosts` (DNS names or IP addresses): `server.pem`
/// and `server.key`.
pub fn make_server(dir: &Path, hosts: &[String]) -> Result<PathBuf, CertError> {
    let mut params = CertificateParams::new(hosts.to_vec())?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(
        DnType::CommonName,
        hosts.first().map_or("umbra", String::as_str),
    );
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    sign(dir, "server", params)
}

/// A device certificate whose subject common name is `name`: `{name}.pem`
/// and `{name}.key`. Returns the certificate's path and its serial number in
/// hex (what a revocation list names).
pub fn make_device(dir: &Path, name: &str) -> Result<(PathBuf, String), CertError> {
    let safe = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | ':' | '.'))
        && !name.starts_with('.')
        && name != "ca"
        && name != "server";
    if !safe {
        return Err(CertError::Name(name.to_owned()));
    }
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    // A positive 16-byte serial without a leading zero byte, so that its hex
    // reads the same everywhere.
    let mut serial: [u8; 16] = rand::random();
    serial[0] = (serial[0] & 0x7f) | 0x40;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let hex = serial.iter().map(|b| format!("{b:02x}")).collect();
    Ok((sign(dir, name, params)?, hex))
}

/// A CRL signed by the CA in `dir` that revokes `serials` (hex), valid for
/// `days`: `crl.pem`, for `[mqtt] revoked_certificates`. It replaces the
/// previous one, so it lists every revoked certificate.
pub fn make_crl(dir: &Path, serials: &[String], days: u32) -> Result<PathBuf, CertError> {
    let (ca, ca_key) = load_ca(dir)?;
    let now = OffsetDateTime::now_utc();
    let revoked_certs = serials
        .iter()
        .map(|hex| {
            let digits: String = hex.chars().filter(|c| *c != ':').collect();
            let bytes = (digits.len().is_multiple_of(2) && !digits.is_empty())
                .then(|| {
                    (0..digits.len())
                        .step_by(2)
                        .map(|i| u8::from_str_radix(digits.get(i..i + 2)?, 16).ok())
                        .collect::<Option<Vec<u8>>>()
                })
                .flatten()
                .ok_or_else(|| CertError::Serial(hex.clone()))?;
            Ok(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&bytes),
                revocation_time: now,
                reason_code: Some(RevocationReason::Unspecified),
                invalidity_date: None,
            })
        })
        .collect::<Result<Vec<_>, CertError>>()?;
    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: now + Duration::days(days.max(1).into()),
        // Later lists have higher numbers.
        crl_number: SerialNumber::from(now.unix_timestamp().unsigned_abs()),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&ca, &ca_key)?;
    let path = dir.join("crl.pem");
    write(&path, &crl.pem()?, false)?;
    Ok(path)
}
