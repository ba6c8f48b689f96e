//! A client of the Linux watchdog interface (`/dev/watchdog`, or a plain file / FIFO in
//! tests and in the lab). Opening the device arms it; every keepalive restarts its
//! timer; closing it after writing the magic character 'V' disarms it. Closing it any
//! other way (including the process dying) leaves the timer running: the host resets
//! unless someone pets it again. So the magic close is done only on a clean stop or when
//! the manager disarms watchdogs.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct Watchdog {
    path: PathBuf,
    file: File,
    /// The device answers the keepalive ioctl; otherwise keepalives are plain writes.
    ioctl: bool,
}

impl Watchdog {
    /// Opens (and so arms) the watchdog at `path`.
    pub fn open(path: &Path) -> std::io::Result<Watchdog> {
        let file = OpenOptions::new().append(true).create(true).open(path)?;
        let is_device = file.metadata()?.file_type().is_char_device();
        let mut watchdog = Watchdog { path: path.to_owned(), file, ioctl: is_device };
        watchdog.keepalive()?;
        Ok(watchdog)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Restarts the watchdog's timer.
    pub fn keepalive(&mut self) -> std::io::Result<()> {
        if self.ioctl {
            match ioctl_keepalive(&self.file) {
                Ok(()) => return Ok(()),
                // Not a watchdog driver after all: plain writes pet it too.
                Err(error) if error.raw_os_error() == Some(libc::ENOTTY) => self.ioctl = false,
                Err(error) => return Err(error),
            }
        }
        self.file.write_all(b"k")?;
        self.file.flush()
    }

    /// Disarms: the magic character, then close. Only for a clean stop or a manager
    /// directive, after the heartbeat records say "watchdog not armed".
    pub fn magic_close(mut self) -> std::io::Result<()> {
        self.file.write_all(b"V")?;
        self.file.flush()
    }
}

/// `WDIOC_KEEPALIVE`: `_IOR('W', 5, int)` in linux/watchdog.h.
const WDIOC_KEEPALIVE: libc::c_ulong = (2 << 30) | (4 << 16) | ((b'W' as libc::c_ulong) << 8) | 5;

#[allow(unsafe_code)]
fn ioctl_keepalive(file: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut unused: libc::c_int = 0;
    // SAFETY: `file` is open for the whole call, so the descriptor is valid; the
    // keepalive ioctl reads nothing and at most writes one int, for which `unused` is
    // valid, writable memory that lives across the call.
    let result = unsafe { libc::ioctl(file.as_raw_fd(), WDIOC_KEEPALIVE as _, &mut unused as *mut libc::c_int) };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_keepalive_ioctl_number_is_the_kernels() {
        assert_eq!(WDIOC_KEEPALIVE, 0x8004_5705);
    }

    #[test]
    fn a_plain_file_gets_keepalive_writes_and_the_magic_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("watchdog");
        let mut watchdog = Watchdog::open(&path).unwrap();
        watchdog.keepalive().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"kk");
        watchdog.magic_close().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"kkV");
    }

    #[test]
    fn a_character_device_that_is_no_watchdog_falls_back_to_writes() {
        // Opening pets once: the ioctl is tried, refused (ENOTTY), and writes take over.
        let mut watchdog = Watchdog::open(Path::new("/dev/null")).unwrap();
        assert!(!watchdog.ioctl);
        watchdog.keepalive().unwrap();
        drop(watchdog);
    }
}
