//! The confinement a code evaluation ran under: which layers of the sandbox were in force.
//! The engine's sandbox reports it, and an eval job's result (`eval.json`, the stored result)
//! records it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Who a sandboxed program runs as, relative to the process that started it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Identity {
    /// The starter is root; each run gets its own unprivileged uid.
    DedicatedUid,
    /// The starter's uid, inside a new user namespace (needed to create the other namespaces).
    UserNamespace,
    /// The starter's uid, unchanged.
    Inherited,
}

/// Which confinement was in force, beyond the resource limits, the cleared environment and
/// `PR_SET_NO_NEW_PRIVS` that always are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Isolation {
    /// The Landlock ABI the rules were applied with; 0 when Landlock was not in force.
    #[serde(default)]
    pub landlock_abi: u32,
    /// The seccomp filter was in force.
    #[serde(default)]
    pub seccomp: bool,
    /// Own network namespace: no network, not even to 127.0.0.1.
    pub network: bool,
    /// Own mount namespace: private `/tmp`, `/var/tmp` and `/dev/shm`.
    pub filesystem: bool,
    /// Own PID namespace: all its processes are killed when the program ends.
    pub pid: bool,
    /// Who the program ran as.
    pub identity: Identity,
}

impl Isolation {
    /// The level code evaluation needs without an explicit opt-in: Landlock, seccomp and the
    /// resource limits.
    pub fn is_strong(&self) -> bool {
        self.missing().is_empty()
    }

    /// The layers of the strong level that are not in force, by name.
    pub fn missing(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        if self.landlock_abi == 0 {
            missing.push("landlock");
        }
        if !self.seccomp {
            missing.push("seccomp");
        }
        missing
    }
}

impl fmt::Display for Isolation {
    /// One line, e.g. `strong: landlock v6, seccomp, rlimits, network/mount/pid namespaces,
    /// dedicated uid`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut layers = Vec::new();
        if self.landlock_abi > 0 {
            layers.push(format!("landlock v{}", self.landlock_abi));
        }
        if self.seccomp {
            layers.push("seccomp".to_string());
        }
        layers.push("rlimits".to_string());
        let namespaces: Vec<&str> = [
            (self.network, "network"),
            (self.filesystem, "mount"),
            (self.pid, "pid"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
        if !namespaces.is_empty() {
            layers.push(format!("{} namespaces", namespaces.join("/")));
        }
        layers.push(
            match self.identity {
                Identity::DedicatedUid => "dedicated uid",
                Identity::UserNamespace => "user namespace",
                Identity::Inherited => "same uid",
            }
            .to_string(),
        );
        let level = if self.is_strong() { "strong" } else { "weak" };
        write!(f, "{level}: {}", layers.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn isolation(landlock_abi: u32, seccomp: bool) -> Isolation {
        Isolation {
            landlock_abi,
            seccomp,
            network: false,
            filesystem: false,
            pid: false,
            identity: Identity::Inherited,
        }
    }

    #[test]
    fn strong_needs_landlock_and_seccomp() {
        assert!(isolation(1, true).is_strong());
        assert_eq!(isolation(0, true).missing(), ["landlock"]);
        assert_eq!(isolation(3, false).missing(), ["seccomp"]);
        assert_eq!(isolation(0, false).missing(), ["landlock", "seccomp"]);
        assert_eq!(
            isolation(6, true).to_string(),
            "strong: landlock v6, seccomp, rlimits, same uid"
        );
        let mut full = isolation(0, false);
        full.network = true;
        full.pid = true;
        full.identity = Identity::DedicatedUid;
        assert_eq!(
            full.to_string(),
            "weak: rlimits, network/pid namespaces, dedicated uid"
        );
    }
}
