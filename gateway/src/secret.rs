//! The JWT secret: configured, or generated once into the data directory.
//!
//! A gateway must start with no configuration at all, yet tokens it signs
//! (`kefu token`) must stay valid across restarts. So when `auth.jwt_secret`
//! is empty the secret is read from `<data>/jwt_secret`, and made there (256
//! random bits, hex, mode 0600) the first time.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use tracing::{info, warn};

/// Where the secret came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `auth.jwt_secret` (file, environment or flag).
    Config,
    /// Read from the data directory.
    DataDir,
    /// Generated now into the data directory.
    Generated,
}

/// Returns the secret to sign and check tokens with.
pub fn load_or_create(configured: &str, data_dir: &Path) -> std::io::Result<(String, Source)> {
    if !configured.is_empty() {
        if configured.len() < 32 {
            warn!("auth.jwt_secret is shorter than 32 bytes; HS256 wants at least 256 bits");
        }
        return Ok((configured.to_string(), Source::Config));
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(data_dir)?;
    let path = data_dir.join("jwt_secret");
    // Whoever reads the secret can sign any identity: a file others can
    // read is refused, as ssh refuses a loose private key.
    match std::fs::metadata(&path) {
        Ok(meta) if meta.permissions().mode() & 0o077 != 0 => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "{} is readable by others (mode {:o}); chmod 600 it, and replace the secret if others may have read it",
                    path.display(),
                    meta.permissions().mode() & 0o777
                ),
            ));
        }
        _ => {}
    }
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok((s.trim().to_string(), Source::DataDir)),
        Ok(_) => {
            return Err(std::io::Error::other(format!(
                "{} is empty; delete it to regenerate",
                path.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let bytes: [u8; 32] = rand::random();
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
    file.write_all(secret.as_bytes())?;
    file.sync_all()?;
    info!(path = %path.display(), "no auth.jwt_secret configured: generated a new one");
    Ok((secret, Source::Generated))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (a, src) = load_or_create("", dir.path()).unwrap();
        assert_eq!(src, Source::Generated);
        assert_eq!(a.len(), 64);
        let (b, src) = load_or_create("", dir.path()).unwrap();
        assert_eq!((b.as_str(), src), (a.as_str(), Source::DataDir));
        let mode = std::fs::metadata(dir.path().join("jwt_secret")).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
        let (c, src) = load_or_create("configured-secret", dir.path()).unwrap();
        assert_eq!((c.as_str(), src), ("configured-secret", Source::Config));
    }

    #[test]
    fn a_secret_others_can_read_is_refused_and_a_new_directory_is_private() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("data");
        load_or_create("", &dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        let file = dir.join("jwt_secret");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_create("", &dir).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }
}
