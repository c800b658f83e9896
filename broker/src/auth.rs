//! Who a client is. A client proves it with a user name and password from
//! the password file (one `name:hash` line per device, the hash an argon2id
//! PHC string), with the fleet-wide shared credential, or not at all (only
//! when neither is configured). A password-file user is an identity: unless
//! configured otherwise, its client id must be its user name, so that a
//! device cannot act as another thing.
//!
//! The file is managed with `umbra passwd` ([`PasswordFile::set`],
//! [`PasswordFile::remove`]) and reloaded when it changes or on SIGHUP
//! ([`Authenticator::reload`]) without touching connected clients.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::SystemTime;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Argon2, Params};
use ring::hmac;
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::embedded::Credentials;
use crate::transport::PeerCert;

/// A password file that cannot be used, with the line at fault.
#[derive(Debug, thiserror::Error)]
pub enum PasswordFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write password file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("password file line {line}: {reason}")]
    Line { line: usize, reason: String },
    #[error("invalid user name {0:?}: it must be 1 to 128 bytes without whitespace or control characters")]
    Name(String),
    #[error("cannot hash the password: {0}")]
    Hash(String),
    #[error("revocation list {path}: {reason}")]
    Revocations { path: PathBuf, reason: String },
}

/// The users of a password file and their password hashes, by name (a
/// rewritten file lists them in name order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PasswordFile {
    entries: BTreeMap<String, String>,
}

/// AWS IoT's thing-name limit, which a device's user name is.
const MAX_NAME_BYTES: usize = 128;

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && !name.chars().any(|c| c.is_whitespace() || c.is_control())
}

impl PasswordFile {
    /// Parses `name:hash` lines; blank lines and `#` comments are skipped.
    /// A name may contain `:` (AWS thing names may), so a line splits at its
    /// last `:` (a PHC string has none).
    pub fn parse(text: &str) -> Result<PasswordFile, PasswordFileError> {
        let mut entries = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let line_error = |reason: String| PasswordFileError::Line {
                line: n + 1,
                reason,
            };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((name, hash)) = line.rsplit_once(':') else {
                return Err(line_error("expected name:hash".into()));
            };
            if !valid_name(name) {
                return Err(line_error(format!("invalid user name {name:?}")));
            }
            let parsed = PasswordHash::new(hash)
                .map_err(|e| line_error(format!("{name}: not a PHC hash string ({e})")))?;
            if parsed.algorithm.as_str() != "argon2id" {
                return Err(line_error(format!(
                    "{name}: hash is {}, not argon2id",
                    parsed.algorithm
                )));
            }
            if entries.insert(name.to_owned(), hash.to_owned()).is_some() {
                return Err(line_error(format!("{name} appears twice")));
            }
        }
        Ok(PasswordFile { entries })
    }

    pub fn read(path: &Path) -> Result<PasswordFile, PasswordFileError> {
        PasswordFile::parse(&read_text(path)?)
    }

    /// Reads `path`, or starts an empty file if there is none.
    fn read_or_new(path: &Path) -> Result<PasswordFile, PasswordFileError> {
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PasswordFile::default()),
            _ => PasswordFile::read(path),
        }
    }

    pub fn users(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    fn hash_of(&self, name: &str) -> Option<&str> {
        self.entries.get(name).map(String::as_str)
    }

    /// Sets `name`'s password in the file at `path` (created if missing),
    /// hashed with argon2id and `params` (`Params::default()`: OWASP's
    /// 19 MiB, 2 passes).
    pub fn set(
        path: &Path,
        name: &str,
        password: &str,
        params: Params,
    ) -> Result<(), PasswordFileError> {
        if !valid_name(name) {
            return Err(PasswordFileError::Name(name.to_owned()));
        }
        let mut file = PasswordFile::read_or_new(path)?;
        let hash = hash_password(password, params)?;
        file.entries.insert(name.to_owned(), hash);
        file.write(path)
    }

    /// Removes `name` from the file at `path`. Returns whether it was there.
    pub fn remove(path: &Path, name: &str) -> Result<bool, PasswordFileError> {
        let mut file = PasswordFile::read(path)?;
        if file.entries.remove(name).is_none() {
            return Ok(false);
        }
        file.write(path)?;
        Ok(true)
    }

    /// Replaces the file at once (a reader sees the old or the new one),
    /// readable by its owner only.
    fn write(&self, path: &Path) -> Result<(), PasswordFileError> {
        let error = |source| PasswordFileError::Write {
            path: path.to_path_buf(),
            source,
        };
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let mut tmp = tempfile_in(dir).map_err(error)?;
        for (name, hash) in &self.entries {
            writeln!(tmp.0, "{name}:{hash}").map_err(error)?;
        }
        tmp.0.sync_all().map_err(error)?;
        std::fs::rename(&tmp.1, path).map_err(error)
    }
}

/// A new file beside the target, owner-only, that the rename replaces it with.
fn tempfile_in(dir: &Path) -> std::io::Result<(std::fs::File, PathBuf)> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(format!(".umbra-passwd-{:016x}", rand::random::<u64>()));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    Ok((file, path))
}

/// An argon2id PHC string of `password` with a random salt.
pub fn hash_password(password: &str, params: Params) -> Result<String, PasswordFileError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| PasswordFileError::Hash(e.to_string()))
}

/// Which part of a client certificate names the device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertificateIdentity {
    /// The subject's common name (CN).
    #[default]
    CommonName,
    /// The first DNS name among the subject alternative names.
    DnsName,
}

/// What a CONNECT's credentials come to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed; `identity` is the password-file user or certificate
    /// subject it proved to be.
    Allowed { identity: Option<String> },
    /// Missing or wrong user name or password.
    BadCredentials,
    /// Proven, but the client id is not the identity's.
    NotAuthorized,
    /// A certificate on the revocation list.
    Revoked,
}

/// The password file's users and the revoked certificate serials as last
/// loaded, and when those files were written.
#[derive(Debug, Default)]
struct Loaded {
    file: PasswordFile,
    revoked: HashSet<String>,
    stamps: [Option<(SystemTime, u64)>; 2],
}

/// A revocation list file, and the CAs whose CRLs it may hold.
///
/// The file is either text, one certificate serial number in hex per line
/// (`:` separators and leading zeros allowed, `#` comments), or one or more
/// CRLs (PEM `X509 CRL` blocks, or one DER CRL), each of which must be signed
/// by one of `issuers` (the TLS listeners' client CAs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationList {
    pub path: PathBuf,
    /// The client CAs' certificates, DER.
    pub issuers: Vec<Vec<u8>>,
}

impl RevocationList {
    /// The revoked serial numbers, lower-case hex without leading zeros
    /// (as [`PeerCert::serial`]).
    pub fn read(&self) -> Result<HashSet<String>, PasswordFileError> {
        let bytes = std::fs::read(&self.path).map_err(|source| PasswordFileError::Read {
            path: self.path.clone(),
            source,
        })?;
        let failed = |reason: String| PasswordFileError::Revocations {
            path: self.path.clone(),
            reason,
        };
        if bytes.first() == Some(&0x30) {
            return self.crl_serials(&bytes).map_err(failed);
        }
        let text =
            std::str::from_utf8(&bytes).map_err(|_| failed("neither text nor a DER CRL".into()))?;
        if !text.contains("-----BEGIN X509 CRL-----") {
            return parse_serials(text).map_err(failed);
        }
        let mut serials = HashSet::new();
        for pem in x509_parser::pem::Pem::iter_from_buffer(&bytes) {
            let pem = pem.map_err(|e| failed(format!("PEM: {e}")))?;
            if pem.label == "X509 CRL" {
                serials.extend(self.crl_serials(&pem.contents).map_err(failed)?);
            }
        }
        Ok(serials)
    }

    /// The serials a DER CRL revokes, once its signature is one of the
    /// issuers'.
    fn crl_serials(&self, der: &[u8]) -> Result<HashSet<String>, String> {
        let (_, crl) = x509_parser::parse_x509_crl(der).map_err(|e| format!("CRL: {e}"))?;
        let signed = self.issuers.iter().any(|issuer| {
            x509_parser::parse_x509_certificate(issuer)
                .is_ok_and(|(_, ca)| crl.verify_signature(ca.public_key()).is_ok())
        });
        if !signed {
            return Err(format!(
                "the CRL of {} is signed by none of the listeners' client CAs",
                crl.issuer()
            ));
        }
        Ok(crl
            .iter_revoked_certificates()
            .map(|revoked| format!("{:x}", revoked.serial()))
            .collect())
    }
}

/// Parses a text revocation list: one serial number in hex per line.
fn parse_serials(text: &str) -> Result<HashSet<String>, String> {
    let mut serials = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let hex: String = line.chars().filter(|c| *c != ':').collect();
        if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!("line {}: not a hex serial number: {line:?}", n + 1));
        }
        let serial = hex.to_ascii_lowercase();
        let serial = serial.trim_start_matches('0');
        serials.insert(if serial.is_empty() { "0" } else { serial }.to_owned());
    }
    Ok(serials)
}

/// Checks every CONNECT's credentials. Argon2id verification is slow on
/// purpose (tens of ms, 19 MiB), so it runs on blocking threads, at most one
/// per core at a time; a password verified once is remembered as an HMAC
/// under a key of this process, so that a reconnecting device costs a hash
/// lookup, not another argon2 run (until its password changes).
pub struct Authenticator {
    shared: Option<Credentials>,
    path: Option<PathBuf>,
    revocations: Option<RevocationList>,
    client_id_is_user: bool,
    certificate_identity: CertificateIdentity,
    loaded: RwLock<Arc<Loaded>>,
    verified: Mutex<HashMap<String, (String, hmac::Tag)>>,
    key: hmac::Key,
    hashing: Semaphore,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("path", &self.path)
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Loads the password file, if any: a file that cannot be used is an
    /// error here (at start), and a logged, ignored change later.
    pub fn new(
        shared: Option<Credentials>,
        path: Option<PathBuf>,
        revocations: Option<RevocationList>,
        client_id_is_user: bool,
        certificate_identity: CertificateIdentity,
    ) -> Result<Authenticator, PasswordFileError> {
        let rng = ring::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .map_err(|_| PasswordFileError::Hash("no system randomness".into()))?;
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let auth = Authenticator {
            shared,
            path,
            revocations,
            client_id_is_user,
            certificate_identity,
            loaded: RwLock::new(Arc::default()),
            verified: Mutex::new(HashMap::new()),
            key,
            hashing: Semaphore::new(cores),
        };
        auth.reload()?;
        Ok(auth)
    }

    /// Whether clients must authenticate at all.
    pub fn required(&self) -> bool {
        self.shared.is_some() || self.path.is_some()
    }

    /// Whether there are files to reload (password file, revocation list).
    pub fn has_files(&self) -> bool {
        self.path.is_some() || self.revocations.is_some()
    }

    fn stamps(&self) -> [Option<(SystemTime, u64)>; 2] {
        [
            self.path.as_deref().and_then(file_stamp),
            self.revocations.as_ref().and_then(|r| file_stamp(&r.path)),
        ]
    }

    fn loaded(&self) -> Arc<Loaded> {
        Arc::clone(&self.loaded.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Reads the password file and the revocation list again. On error
    /// what was loaded before stays. Returns how many users there are now.
    pub fn reload(&self) -> Result<usize, PasswordFileError> {
        let stamps = self.stamps();
        let file = match &self.path {
            Some(path) => PasswordFile::read(path)?,
            None => PasswordFile::default(),
        };
        let revoked = match &self.revocations {
            Some(list) => list.read()?,
            None => HashSet::new(),
        };
        let users = file.entries.len();
        self.verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|name, (hash, _)| file.hash_of(name) == Some(hash.as_str()));
        *self.loaded.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(Loaded {
            file,
            revoked,
            stamps,
        });
        Ok(users)
    }

    /// Reloads the files if one was written since they were loaded. Logs
    /// what happened; a file that cannot be used is not taken.
    pub fn reload_if_changed(&self) {
        if self.has_files() && self.stamps() != self.loaded().stamps {
            self.reload_logged();
        }
    }

    /// [`reload`](Self::reload), with the outcome logged.
    pub fn reload_logged(&self) {
        match self.reload() {
            Ok(users) => info!(
                users,
                revoked = self.loaded().revoked.len(),
                "password file and revocation list loaded"
            ),
            Err(err) => warn!(%err, "credentials not reloaded; what was loaded before stays"),
        }
    }

    /// Decides a CONNECT that came with a verified client certificate: its
    /// subject's common name (or first DNS name) is the identity.
    pub fn check_certificate(&self, cert: &PeerCert, client_id: &str) -> Verdict {
        if self.loaded().revoked.contains(&cert.serial) {
            return Verdict::Revoked;
        }
        let name = match self.certificate_identity {
            CertificateIdentity::CommonName => &cert.common_name,
            CertificateIdentity::DnsName => &cert.dns_name,
        };
        match name {
            Some(name) if !self.client_id_is_user || name == client_id => Verdict::Allowed {
                identity: Some(name.clone()),
            },
            _ => Verdict::NotAuthorized,
        }
    }

    /// Decides a CONNECT with `login` and `client_id`.
    pub async fn check(&self, login: Option<(&str, &str)>, client_id: &str) -> Verdict {
        if !self.required() {
            return Verdict::Allowed { identity: None };
        }
        let Some((user, password)) = login else {
            return Verdict::BadCredentials;
        };
        let loaded = self.loaded();
        if let Some(hash) = loaded.file.hash_of(user) {
            if !self.verify(user, password, hash).await {
                return Verdict::BadCredentials;
            }
            if self.client_id_is_user && client_id != user {
                return Verdict::NotAuthorized;
            }
            return Verdict::Allowed {
                identity: Some(user.to_owned()),
            };
        }
        match &self.shared {
            Some(shared)
                if (user.as_bytes().ct_eq(shared.username.as_bytes())
                    & password.as_bytes().ct_eq(shared.password.as_bytes()))
                .into() =>
            {
                Verdict::Allowed { identity: None }
            }
            _ => Verdict::BadCredentials,
        }
    }

    async fn verify(&self, user: &str, password: &str, hash: &str) -> bool {
        let remembered = self
            .verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(user)
            .filter(|(h, _)| h == hash)
            .map(|(_, tag)| tag.as_ref().to_vec());
        if let Some(tag) = remembered {
            return hmac::verify(&self.key, password.as_bytes(), &tag).is_ok();
        }
        let Ok(_permit) = self.hashing.acquire().await else {
            return false;
        };
        let (checked_hash, checked_password) = (hash.to_owned(), password.to_owned());
        let ok = tokio::task::spawn_blocking(move || {
            PasswordHash::new(&checked_hash).is_ok_and(|parsed| {
                Argon2::default()
                    .verify_password(checked_password.as_bytes(), &parsed)
                    .is_ok()
            })
        })
        .await
        .unwrap_or(false);
        if ok {
            let tag = hmac::sign(&self.key, password.as_bytes());
            self.verified
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(user.to_owned(), (hash.to_owned(), tag));
        }
        ok
    }
}

fn read_text(path: &Path) -> Result<String, PasswordFileError> {
    std::fs::read_to_string(path).map_err(|source| PasswordFileError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// When and how big the file was last written (`None`: unreadable).
fn file_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Cheap argon2id parameters for tests (the file records them per hash).
#[cfg(test)]
pub(crate) fn test_params() -> Params {
    Params::new(64, 1, 1, None).expect("valid parameters")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(password: &str) -> String {
        hash_password(password, test_params()).expect("hashes")
    }

    #[test]
    fn the_file_is_name_colon_hash_lines() {
        let text = format!(
            "# devices\n\nlamp-1:{}\nfactory:line:7:{}\n",
            hash("a"),
            hash("b")
        );
        let file = PasswordFile::parse(&text).expect("parses");
        assert_eq!(
            file.users().collect::<Vec<_>>(),
            ["factory:line:7", "lamp-1"]
        );
    }

    #[test]
    fn a_bad_line_is_named() {
        let h = hash("a");
        for (text, expected) in [
            ("lamp-1".to_string(), "line 1: expected name:hash"),
            (
                format!("\nlamp-1:{h}\nlamp-1:{h}"),
                "line 3: lamp-1 appears twice",
            ),
            (
                "lamp-1:secret".to_string(),
                "line 1: lamp-1: not a PHC hash",
            ),
            (format!("bad name:{h}"), "line 1: invalid user name"),
            (
                "lamp-1:$argon2i$v=19$m=64,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA".to_string(),
                "line 1: lamp-1: hash is argon2i, not argon2id",
            ),
        ] {
            let err = PasswordFile::parse(&text).expect_err(&text).to_string();
            assert!(err.contains(expected), "{err:?} should say {expected:?}");
        }
    }

    #[test]
    fn set_and_remove_rewrite_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("passwd");
        PasswordFile::set(&path, "lamp-1", "one", test_params()).expect("set");
        PasswordFile::set(&path, "lamp-2", "two", test_params()).expect("set");
        PasswordFile::set(&path, "lamp-1", "uno", test_params()).expect("changed");
        let file = PasswordFile::read(&path).expect("reads");
        assert_eq!(file.users().collect::<Vec<_>>(), ["lamp-1", "lamp-2"]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path)
            .expect("exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(PasswordFile::remove(&path, "lamp-1").expect("removed"));
        assert!(!PasswordFile::remove(&path, "lamp-1").expect("gone already"));
        let file = PasswordFile::read(&path).expect("reads");
        assert_eq!(file.users().collect::<Vec<_>>(), ["lamp-2"]);
        assert!(PasswordFile::set(&path, "", "x", test_params()).is_err());
    }

    #[tokio::test]
    async fn a_user_proves_its_password_and_uses_its_own_client_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("passwd");
        PasswordFile::set(&path, "lamp-1", "right", test_params()).expect("set");
        let shared = Credentials {
            username: "fleet".into(),
            password: "shared".into(),
        };
        let auth = Authenticator::new(
            Some(shared),
            Some(path.clone()),
            None,
            true,
            CertificateIdentity::default(),
        )
        .expect("loads");
        let lamp = |password| Some(("lamp-1", password));
        let allowed = Verdict::Allowed {
            identity: Some("lamp-1".into()),
        };
        assert_eq!(auth.check(lamp("right"), "lamp-1").await, allowed);
        // Remembered: the same again, and still no other password.
        assert_eq!(auth.check(lamp("right"), "lamp-1").await, allowed);
        assert_eq!(
            auth.check(lamp("wrong"), "lamp-1").await,
            Verdict::BadCredentials
        );
        assert_eq!(
            auth.check(lamp("right"), "lamp-2").await,
            Verdict::NotAuthorized
        );
        assert_eq!(auth.check(None, "lamp-1").await, Verdict::BadCredentials);
        assert_eq!(
            auth.check(Some(("nobody", "right")), "nobody").await,
            Verdict::BadCredentials
        );
        // The shared credential proves no identity.
        assert_eq!(
            auth.check(Some(("fleet", "shared")), "any").await,
            Verdict::Allowed { identity: None }
        );

        // A changed password: the remembered one no longer opens.
        PasswordFile::set(&path, "lamp-1", "new", test_params()).expect("set");
        assert_eq!(auth.reload().expect("reloads"), 1);
        assert_eq!(
            auth.check(lamp("right"), "lamp-1").await,
            Verdict::BadCredentials
        );
        assert_eq!(auth.check(lamp("new"), "lamp-1").await, allowed);
        // A broken file is not taken: the users loaded before stay.
        std::fs::write(&path, "garbage").expect("written");
        assert!(auth.reload().is_err());
        assert_eq!(auth.check(lamp("new"), "lamp-1").await, allowed);
    }

    #[test]
    fn a_certificate_names_its_device_by_cn_or_dns_name() {
        let mut params = rcgen::CertificateParams::new(vec!["lamp-7".to_string()]).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Acme lamp");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationalUnitName, "lamps");
        let key = rcgen::KeyPair::generate().expect("key");
        let der = params.self_signed(&key).expect("cert").der().to_vec();
        let cert = PeerCert::from_der(&der).expect("parses");
        assert_eq!(cert.common_name.as_deref(), Some("Acme lamp"));
        assert_eq!(cert.dns_name.as_deref(), Some("lamp-7"));
        assert_eq!(cert.units, ["lamps"]);
        let by = |identity| {
            Authenticator::new(None, None, None, true, identity).expect("nothing to load")
        };
        assert_eq!(
            by(CertificateIdentity::DnsName).check_certificate(&cert, "lamp-7"),
            Verdict::Allowed {
                identity: Some("lamp-7".into())
            }
        );
        assert_eq!(
            by(CertificateIdentity::CommonName).check_certificate(&cert, "lamp-7"),
            Verdict::NotAuthorized
        );
    }

    #[tokio::test]
    async fn without_credentials_configured_everyone_is_anonymous() {
        let auth = Authenticator::new(None, None, None, true, CertificateIdentity::default())
            .expect("nothing to load");
        assert!(!auth.required());
        assert_eq!(
            auth.check(None, "x").await,
            Verdict::Allowed { identity: None }
        );
    }

    #[test]
    fn a_revocation_list_is_serials_or_crls_signed_by_a_client_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (pki, other) = (dir.path().join("pki"), dir.path().join("other"));
        let ca = crate::certs::make_ca(&pki).expect("ca");
        crate::certs::make_ca(&other).expect("another ca");
        let (_, serial) = crate::certs::make_device(&pki, "lamp-1").expect("device");
        let der = |path: &Path| {
            let pem = std::fs::read(path).expect("ca pem");
            rustls_pemfile::certs(&mut pem.as_slice())
                .map(|c| c.expect("cert").to_vec())
                .collect::<Vec<_>>()
        };
        let list = |path: PathBuf| RevocationList {
            path,
            issuers: der(&ca),
        };

        let text = dir.path().join("revoked.txt");
        std::fs::write(&text, format!("# one\n00:{}\n", serial.to_uppercase())).expect("written");
        assert_eq!(
            list(text.clone()).read().expect("reads"),
            HashSet::from([serial.clone()])
        );
        std::fs::write(&text, "lamp-1\n").expect("written");
        let err = list(text).read().expect_err("not hex").to_string();
        assert!(err.contains("line 1: not a hex serial"), "{err}");

        let crl = crate::certs::make_crl(&pki, std::slice::from_ref(&serial), 1).expect("crl");
        assert_eq!(
            list(crl.clone()).read().expect("reads"),
            HashSet::from([serial.clone()])
        );
        // The same CRL as DER.
        let pem = std::fs::read(&crl).expect("crl pem");
        let (_, block) = x509_parser::pem::parse_x509_pem(&pem).expect("pem");
        let der_path = dir.path().join("crl.der");
        std::fs::write(&der_path, &block.contents).expect("written");
        assert_eq!(
            list(der_path).read().expect("reads"),
            HashSet::from([serial.clone()])
        );

        let forged = crate::certs::make_crl(&other, std::slice::from_ref(&serial), 1).expect("crl");
        let err = list(forged)
            .read()
            .expect_err("signed by another CA")
            .to_string();
        assert!(
            err.contains("signed by none of the listeners' client CAs"),
            "{err}"
        );
    }
}
