//! Which namespaces a run enters (network, mount, PID, and a user namespace when not root).

/// Which namespaces a run enters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Namespaces {
    pub(super) user: bool,
    pub(super) net: bool,
    pub(super) mount: bool,
    pub(super) pid: bool,
}

impl Namespaces {
    pub(super) const NONE: Namespaces = Namespaces {
        user: false,
        net: false,
        mount: false,
        pid: false,
    };

    pub(super) fn clone_flags(self) -> libc::c_int {
        let mut flags = 0;
        if self.user {
            flags |= libc::CLONE_NEWUSER;
        }
        if self.net {
            flags |= libc::CLONE_NEWNET;
        }
        if self.mount {
            flags |= libc::CLONE_NEWNS;
        }
        if self.pid {
            flags |= libc::CLONE_NEWPID;
        }
        flags
    }
}
