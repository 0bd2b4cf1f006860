//! Controller configuration: defaults, a TOML file, and the tenants it defines.
//!
//! ```toml
//! listen = "127.0.0.1:7070"
//! data_dir = "/var/lib/remora"
//! slab_size = "1MiB"
//! placement = "p2c"            # or "least-loaded"
//! heartbeat_interval = "200ms"
//! dead_after = "2s"
//! reconcile_interval = "30s"     # how often orphan slabs are reclaimed
//! rebuild_rate = "256MiB"        # per second, for rebuilding a dead server's slabs
//! cluster_secret = "..."         # servers must present it to register
//!
//! [[tenants]]
//! name = "analytics"
//! token = "s3cret"
//! quota = "64GiB"              # optional; unlimited when absent
//! admin = false                # admins see every tenant in `remora status`
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use remora_proto::size::parse_size;
use serde::Deserialize;

use crate::placement::Policy;
use crate::store::StoredTenant;

/// Default slab size: 1 MiB. See ARCHITECTURE.md, "Slab size", for the measurement.
pub const DEFAULT_SLAB_SIZE: u64 = 1 << 20;

/// Default rebuild rate: 256 MiB/s.
pub const DEFAULT_REBUILD_RATE: u64 = 256 << 20;

/// Controller configuration.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Listen address.
    pub listen: String,
    /// Directory of the metadata store (`None`: in memory, nothing persists).
    pub data_dir: Option<PathBuf>,
    /// Cluster slab size in bytes.
    pub slab_size: u64,
    /// Placement policy.
    pub placement: Policy,
    /// How often servers heartbeat.
    pub heartbeat_interval: Duration,
    /// A server that missed heartbeats this long is declared dead.
    pub dead_after: Duration,
    /// How often live servers are checked for orphan slabs.
    pub reconcile_interval: Duration,
    /// Bytes per second the rebuild of lost slabs may read and write, so
    /// that it leaves the servers' bandwidth to the clients.
    pub rebuild_rate: u64,
    /// Tenants to create or update at start.
    pub tenants: Vec<StoredTenant>,
    /// Secret memory servers must present to register (`None`: any server
    /// that can reach the controller may join; set one in production).
    pub cluster_secret: Option<String>,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            listen: "127.0.0.1:7070".into(),
            data_dir: None,
            slab_size: DEFAULT_SLAB_SIZE,
            placement: Policy::PowerOfTwo,
            heartbeat_interval: Duration::from_millis(200),
            dead_after: Duration::from_secs(2),
            reconcile_interval: Duration::from_secs(30),
            rebuild_rate: DEFAULT_REBUILD_RATE,
            tenants: Vec::new(),
            cluster_secret: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    slab_size: Option<String>,
    placement: Option<String>,
    heartbeat_interval: Option<String>,
    dead_after: Option<String>,
    reconcile_interval: Option<String>,
    rebuild_rate: Option<String>,
    cluster_secret: Option<String>,
    #[serde(default)]
    tenants: Vec<FileTenant>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTenant {
    name: String,
    token: String,
    quota: Option<String>,
    #[serde(default)]
    admin: bool,
}

/// Configuration errors.
#[derive(Debug, thiserror::Error)]
#[error("config {path}: {msg}")]
pub struct ConfigError {
    path: String,
    msg: String,
}

impl ControllerConfig {
    /// Applies the settings of a TOML file on top of `self`.
    pub fn load_file(mut self, path: &Path) -> Result<Self, ConfigError> {
        let e = |msg: String| ConfigError {
            path: path.display().to_string(),
            msg,
        };
        let text = std::fs::read_to_string(path).map_err(|x| e(x.to_string()))?;
        let f: File = toml::from_str(&text).map_err(|x| e(x.to_string()))?;
        if let Some(v) = f.listen {
            self.listen = v;
        }
        if let Some(v) = f.data_dir {
            self.data_dir = Some(v);
        }
        if let Some(v) = f.slab_size {
            self.slab_size = parse_size(&v).map_err(|x| e(x.to_string()))?;
        }
        if let Some(v) = f.placement {
            self.placement = v.parse().map_err(e)?;
        }
        if let Some(v) = f.heartbeat_interval {
            self.heartbeat_interval = remora_net::parse_duration(&v).map_err(e)?;
        }
        if let Some(v) = f.dead_after {
            self.dead_after = remora_net::parse_duration(&v).map_err(e)?;
        }
        if let Some(v) = f.rebuild_rate {
            self.rebuild_rate = parse_size(&v).map_err(|x| e(x.to_string()))?;
        }
        if let Some(v) = f.reconcile_interval {
            self.reconcile_interval = remora_net::parse_duration(&v).map_err(e)?;
        }
        if let Some(v) = f.cluster_secret {
            self.cluster_secret = Some(v);
        }
        for t in f.tenants {
            let quota = match t.quota {
                Some(q) => Some(parse_size(&q).map_err(|x| e(x.to_string()))?),
                None => None,
            };
            self.tenants.push(StoredTenant {
                name: t.name,
                token: t.token,
                quota,
                admin: t.admin,
            });
        }
        self.validate().map_err(e)?;
        Ok(self)
    }

    /// How long a server may serve after a heartbeat the controller
    /// answered: half of `dead_after`, so it stops before it can be declared
    /// dead and its data rebuilt elsewhere.
    pub fn lease(&self) -> Duration {
        self.dead_after / 2
    }

    /// Checks the settings make sense together.
    pub fn validate(&self) -> Result<(), String> {
        if self.slab_size < 4096 || !self.slab_size.is_power_of_two() {
            return Err(format!(
                "slab size {} must be a power of two of at least 4 KiB",
                self.slab_size
            ));
        }
        if self.slab_size > 1 << 30 {
            return Err("slab size must be at most 1 GiB".into());
        }
        if self.reconcile_interval < Duration::from_millis(100) {
            return Err("reconcile_interval must be at least 100ms".into());
        }
        if self.dead_after < self.heartbeat_interval * 3 {
            return Err(
                "dead_after must be at least three heartbeat intervals (servers serve for dead_after/2 after each answered heartbeat)".into(),
            );
        }
        if self.rebuild_rate < 1 << 20 {
            return Err("rebuild_rate must be at least 1MiB (per second)".into());
        }
        let mut names = std::collections::HashSet::new();
        let mut tokens = std::collections::HashSet::new();
        for t in &self.tenants {
            if t.name.is_empty() || t.token.is_empty() {
                return Err("tenant name and token must not be empty".into());
            }
            if !names.insert(&t.name) {
                return Err(format!("tenant {:?} defined twice", t.name));
            }
            if !tokens.insert(&t.token) {
                return Err(format!("tenant {:?} reuses another tenant's token", t.name));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            r#"
slab_size = "64KiB"
placement = "least-loaded"
dead_after = "3s"
[[tenants]]
name = "a"
token = "ta"
quota = "1GiB"
[[tenants]]
name = "b"
token = "tb"
admin = true
"#,
        )
        .unwrap();
        let c = ControllerConfig::default().load_file(&p).unwrap();
        assert_eq!(c.slab_size, 64 << 10);
        assert_eq!(c.placement, Policy::LeastLoaded);
        assert_eq!(c.dead_after, Duration::from_secs(3));
        assert_eq!(c.tenants.len(), 2);
        assert_eq!(c.tenants[0].quota, Some(1 << 30));
        assert!(c.tenants[1].admin);
    }

    #[test]
    fn rejects_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        for bad in [
            "slab_size = \"1000\"",
            "placement = \"random\"",
            "unknown_key = 1",
            "[[tenants]]\nname = \"a\"\ntoken = \"x\"\n[[tenants]]\nname = \"b\"\ntoken = \"x\"",
            "slab_size = ",
        ] {
            std::fs::write(&p, bad).unwrap();
            assert!(ControllerConfig::default().load_file(&p).is_err(), "{bad}");
        }
        assert!(ControllerConfig::default()
            .load_file(&dir.path().join("missing"))
            .is_err());
    }
}
