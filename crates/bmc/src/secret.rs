//! A password that cannot leak through `Debug`, `Display`, errors or logs.

use std::fmt;
use zeroize::Zeroize;

/// Secret bytes (a BMC password). `Debug` prints a fixed placeholder, there is
/// no `Display`, and the bytes are wiped on drop so a core dump holds less.
/// The only way to the bytes is [`Secret::expose`], which makes every use
/// greppable.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Secret(bytes.into())
    }

    /// Reads a password file. A single trailing newline is dropped because
    /// `echo pw > file` is how most operators write these files, and BMC
    /// passwords never end in a newline.
    ///
    /// A file every local user may read is refused, naming it: the password
    /// powers hosts off, and `echo pw > file` under the usual umask leaves it
    /// world-readable.
    pub fn from_file(path: &std::path::Path) -> std::io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode();
        if mode & 0o004 != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "password file {} is readable by every user (mode {:o}): chmod 600 it",
                    path.display(),
                    mode & 0o777
                ),
            ));
        }
        let mut bytes = std::fs::read(path)?;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
        }
        Ok(Secret(bytes))
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_bytes() {
        let secret = Secret::new("hunter2-very-secret");
        let shown = format!("{secret:?} {secret:#?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn from_file_drops_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "pass word\n").unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        assert_eq!(Secret::from_file(&path).unwrap().expose(), b"pass word");
        std::fs::write(&path, "pw\n\n").unwrap();
        assert_eq!(Secret::from_file(&path).unwrap().expose(), b"pw\n");
    }

    #[test]
    fn a_world_readable_password_file_is_refused_naming_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bmc.pass");
        std::fs::write(&path, "hunter2-very-secret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = Secret::from_file(&path).unwrap_err();
        let shown = format!("{error} {error:?}");
        assert!(shown.contains(&path.display().to_string()) && shown.contains("644"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        for mode in [0o600, 0o640, 0o400] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(Secret::from_file(&path).unwrap().expose(), b"hunter2-very-secret", "mode {mode:o}");
        }
    }
}
