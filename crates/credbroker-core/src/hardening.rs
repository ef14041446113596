//! What the commands that hold secrets (`serve`, `sidecar`) do to their
//! own process first: no core dumps. A dump of the broker holds admin
//! passwords and every password it just issued; `RLIMIT_CORE` 0 stops the
//! kernel writing one, and "not dumpable" also keeps other processes of
//! the same user from attaching with ptrace or reading `/proc/PID/mem`.

/// Sets `RLIMIT_CORE` to 0 (soft and hard, so it cannot be raised again)
/// and, on Linux, `PR_SET_DUMPABLE` 0. Children started with `exec` (the
/// sidecar's hooks) get their own dumpable flag back from the kernel.
pub fn disable_core_dumps() -> std::io::Result<()> {
    use rustix::process::{setrlimit, Resource, Rlimit};
    setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )?;
    #[cfg(target_os = "linux")]
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn core_dumps_are_off_afterwards() {
        super::disable_core_dumps().unwrap();
        let limit = rustix::process::getrlimit(rustix::process::Resource::Core);
        assert_eq!((limit.current, limit.maximum), (Some(0), Some(0)));
        #[cfg(target_os = "linux")]
        assert_eq!(
            rustix::process::dumpable_behavior().unwrap(),
            rustix::process::DumpableBehavior::NotDumpable
        );
    }
}
