//! Every path in hulld's state directory, named in one place. Other
//! crates get the paths they need from here (the storage stack its
//! [`StoragePaths`], the log store its directory), so no file name of the
//! state dir is spelled twice; the two a client reads too (hulld's log
//! and the images) are named in `hull_client::config`.

use std::path::{Path, PathBuf};

use hull_checkpoint::StoragePaths;

/// hulld's state directory (`state_dir` in the config, mode 0700).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> StateDir {
        StateDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The flock that keeps one hulld per state dir.
    pub fn lock(&self) -> PathBuf {
        self.root.join("hulld.lock")
    }

    /// hulld's own log, rotated like a log source.
    pub fn hulld_log(&self) -> PathBuf {
        hull_client::config::hulld_log(&self.root)
    }

    /// The storage stack: the btrfs volume (or its mount point), its
    /// image when the state dir is not on btrfs, and the catalog.
    pub fn storage(&self) -> StoragePaths {
        StoragePaths {
            state_dir: self.root.clone(),
            volume: self.root.join("volume"),
            volume_image: self.root.join("volume.img"),
            catalog: self.root.join("catalog.db"),
        }
    }

    /// The service registry.
    pub fn services_db(&self) -> PathBuf {
        self.root.join("services.db")
    }

    /// The HTTP API's tokens.
    pub fn tokens_db(&self) -> PathBuf {
        self.root.join("tokens.db")
    }

    /// Where each inner's root filesystem is assembled.
    pub fn rootfs(&self) -> PathBuf {
        self.root.join("rootfs")
    }

    /// The inner's service socket and the `hull` client it runs, mounted
    /// read-only at /run/hull in every inner.
    pub fn services_socket_dir(&self) -> PathBuf {
        self.root.join("inner-api")
    }

    /// The sandbox's network policy, as last set.
    pub fn network_policy(&self) -> PathBuf {
        self.root.join("network-policy.json")
    }

    /// HTTP ingress's bearer token for private ports.
    pub fn ingress_token(&self) -> PathBuf {
        self.root.join("ingress.token")
    }

    /// The inner's resolv.conf, as hulld writes it for "nat" networking.
    pub fn resolv_conf(&self) -> PathBuf {
        self.root.join("resolv.conf")
    }

    /// The log store: a directory per source.
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }

    /// The chunks this machine knows are in the remote (hull-remote's
    /// index), so a resumed push skips them without asking.
    pub fn remote_index(&self) -> PathBuf {
        self.root.join("remote-index")
    }

    /// Base images, unless `image_dir` says otherwise.
    pub fn images(&self) -> PathBuf {
        hull_client::config::image_dir(&self.root, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_is_a_distinct_name_directly_in_the_state_dir() {
        let dir = StateDir::new("/var/lib/hull");
        let storage = dir.storage();
        let paths = [
            dir.lock(),
            dir.hulld_log(),
            storage.volume,
            storage.volume_image,
            storage.catalog,
            dir.services_db(),
            dir.tokens_db(),
            dir.rootfs(),
            dir.services_socket_dir(),
            dir.network_policy(),
            dir.ingress_token(),
            dir.resolv_conf(),
            dir.logs(),
            dir.images(),
            dir.remote_index(),
        ];
        let names: std::collections::BTreeSet<_> = paths.iter().collect();
        assert_eq!(names.len(), paths.len(), "{paths:?}");
        assert!(paths.iter().all(|p| p.parent() == Some(dir.root())));
        assert_eq!(storage.state_dir, dir.root());
    }
}
