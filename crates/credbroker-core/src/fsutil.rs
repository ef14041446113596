//! Small file helpers shared by the sidecar, rotate-root, `pki dev` and
//! the audit log.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Writes `contents` to `path` atomically with mode 0600: a temporary file in
/// the same directory, fsynced, then renamed over the target. Readers see
/// the old file or the new one, never a partial one.
///
/// The temporary file has a random name and is created with
/// `O_CREAT|O_EXCL|O_NOFOLLOW`: in a directory others can write to, a
/// planted file or symlink of that name makes the write fail instead of
/// sending the secret wherever the link points. A symlink at `path` itself
/// is replaced by the rename, never followed.
pub fn write_secret_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let (dir, name) = dir_and_name(path);
    let name = name.unwrap_or("secret");
    let nonce: u64 = rand::random();
    let tmp = dir.join(format!(".{name}.tmp-{}-{nonce:016x}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&tmp)?;
    let result = (|| {
        // The umask may have taken bits away; it cannot have added any.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The directory `path` is in (`.` for a bare name) and its file name,
/// when it has one that is UTF-8.
pub fn dir_and_name(path: &Path) -> (&Path, Option<&str>) {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    (dir, path.file_name().and_then(|n| n.to_str()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn secret_files_are_0600_and_a_symlink_at_the_target_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::write(&elsewhere, "untouched").unwrap();
        let target = dir.path().join("secret");
        std::os::unix::fs::symlink(&elsewhere, &target).unwrap();
        write_secret_file(&target, b"hunter2").unwrap();
        assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), "untouched");
        let meta = std::fs::symlink_metadata(&target).unwrap();
        assert!(meta.file_type().is_file(), "the link was replaced");
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(&target).unwrap(), b"hunter2");
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn the_temporary_file_is_never_opened_through_a_symlink() {
        // What O_EXCL|O_NOFOLLOW guarantee for the random name, shown on a
        // name we can plant: opening it the same way fails.
        let dir = tempfile::tempdir().unwrap();
        let planted = dir.path().join(".secret.tmp-planted");
        std::os::unix::fs::symlink(dir.path().join("victim"), &planted).unwrap();
        let opened = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&planted);
        assert!(opened.is_err());
        assert!(!dir.path().join("victim").exists());
    }
}
