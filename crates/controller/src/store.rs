//! The controller's metadata store: tenants, regions and id counters.
//!
//! [`MetaStore`] is a narrow trait so the backend can change (an etcd
//! backend for a highly available controller is the planned second one).
//! [`RedbStore`] is the default: an embedded, crash-safe B-tree file (redb
//! commits are atomic and durable), so a restarted controller finds every
//! region and tenant again. [`MemStore`] keeps everything in memory, for
//! tests of the controller's logic and throwaway clusters.
//!
//! Values are postcard-encoded [`StoredRegion`] and [`StoredTenant`] records.

use std::collections::BTreeMap;
use std::path::Path;

use parking_lot::Mutex;
use redb::{ReadableTable, TableDefinition};
use remora_proto::ctl::RegionMap;
use serde::{Deserialize, Serialize};

/// A region as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRegion {
    /// Owning tenant's name.
    pub tenant: String,
    /// The region map.
    pub map: RegionMap,
}

/// A tenant as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredTenant {
    /// Name.
    pub name: String,
    /// Secret token.
    pub token: String,
    /// Quota in bytes (`None`: unlimited).
    pub quota: Option<u64>,
    /// May see every tenant and region in status.
    pub admin: bool,
}

/// Everything a controller loads at start.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Tenants by name.
    pub tenants: BTreeMap<String, StoredTenant>,
    /// Regions by id.
    pub regions: BTreeMap<u64, StoredRegion>,
    /// Next region id to hand out.
    pub next_region: u64,
    /// Next slab id to hand out.
    pub next_slab: u64,
}

impl Snapshot {
    /// Makes the counters larger than every id in use, so no id is ever
    /// handed out twice whatever the stored counters say.
    pub fn fix_counters(&mut self) {
        for (id, r) in &self.regions {
            self.next_region = self.next_region.max(id + 1);
            for l in r.map.pieces() {
                self.next_slab = self.next_slab.max(l.slab + 1);
            }
        }
        self.next_region = self.next_region.max(1);
        self.next_slab = self.next_slab.max(1);
    }
}

/// Store failures.
#[derive(Debug, thiserror::Error)]
#[error("metadata store: {0}")]
pub struct StoreError(String);

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

/// A durable home for controller metadata.
///
/// Implementations MUST make each call atomic and durable before returning:
/// the controller acknowledges an allocation only after `put_region` returns.
pub trait MetaStore: Send + Sync + std::fmt::Debug {
    /// Loads everything.
    fn load(&self) -> Result<Snapshot, StoreError>;
    /// Inserts or replaces a tenant.
    fn put_tenant(&self, t: &StoredTenant) -> Result<(), StoreError>;
    /// Inserts or replaces a region and the id counters, in one transaction.
    fn put_region(
        &self,
        r: &StoredRegion,
        next_region: u64,
        next_slab: u64,
    ) -> Result<(), StoreError>;
    /// Inserts or replaces several regions in one transaction.
    fn put_regions(&self, rs: &[&StoredRegion]) -> Result<(), StoreError> {
        for r in rs {
            self.put_region(r, 0, 0)?;
        }
        Ok(())
    }
    /// Deletes a region.
    fn delete_region(&self, id: u64) -> Result<(), StoreError>;
}

const TENANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("tenants");
const REGIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("regions");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

/// Layout of the stored records (postcard is not self-describing, so a
/// store written by another layout must be refused, not misread). 2: region
/// maps with redundancy and lost/restored flags.
pub const SCHEMA: u64 = 2;

/// The embedded, file-backed store.
#[derive(Debug)]
pub struct RedbStore {
    db: redb::Database,
}

impl RedbStore {
    /// Opens or creates the store file `dir/controller.redb`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| err(format!("create {}: {e}", dir.display())))?;
        let path = dir.join("controller.redb");
        let db = redb::Database::create(&path)
            .map_err(|e| err(format!("open {}: {e}", path.display())))?;
        let w = db.begin_write().map_err(err)?;
        {
            w.open_table(TENANTS).map_err(err)?;
            let regions = {
                w.open_table(REGIONS)
                    .map_err(err)?
                    .iter()
                    .map_err(err)?
                    .next()
                    .is_some()
            };
            let mut c = w.open_table(COUNTERS).map_err(err)?;
            let schema = c.get("schema").map_err(err)?.map(|v| v.value());
            match schema {
                Some(SCHEMA) => {}
                None if !regions => {
                    c.insert("schema", SCHEMA).map_err(err)?;
                }
                other => {
                    return Err(err(format!(
                        "{} was written by another version of Remora (store schema {}, this one reads {SCHEMA}); start with an empty --data-dir",
                        path.display(),
                        other.map_or("1".to_string(), |v| v.to_string())
                    )))
                }
            }
        }
        w.commit().map_err(err)?;
        Ok(RedbStore { db })
    }
}

impl MetaStore for RedbStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        let r = self.db.begin_read().map_err(err)?;
        let mut s = Snapshot::default();
        for e in r.open_table(TENANTS).map_err(err)?.iter().map_err(err)? {
            let (_, v) = e.map_err(err)?;
            let t: StoredTenant = postcard::from_bytes(v.value()).map_err(err)?;
            s.tenants.insert(t.name.clone(), t);
        }
        for e in r.open_table(REGIONS).map_err(err)?.iter().map_err(err)? {
            let (k, v) = e.map_err(err)?;
            let reg: StoredRegion = postcard::from_bytes(v.value()).map_err(err)?;
            s.regions.insert(k.value(), reg);
        }
        let c = r.open_table(COUNTERS).map_err(err)?;
        s.next_region = c.get("next_region").map_err(err)?.map_or(1, |v| v.value());
        s.next_slab = c.get("next_slab").map_err(err)?.map_or(1, |v| v.value());
        s.fix_counters();
        Ok(s)
    }

    fn put_tenant(&self, t: &StoredTenant) -> Result<(), StoreError> {
        let bytes = postcard::to_stdvec(t).map_err(err)?;
        let w = self.db.begin_write().map_err(err)?;
        w.open_table(TENANTS)
            .map_err(err)?
            .insert(t.name.as_str(), bytes.as_slice())
            .map_err(err)?;
        w.commit().map_err(err)
    }

    fn put_region(
        &self,
        r: &StoredRegion,
        next_region: u64,
        next_slab: u64,
    ) -> Result<(), StoreError> {
        let bytes = postcard::to_stdvec(r).map_err(err)?;
        let w = self.db.begin_write().map_err(err)?;
        {
            w.open_table(REGIONS)
                .map_err(err)?
                .insert(r.map.id, bytes.as_slice())
                .map_err(err)?;
            // Counters only grow, whatever order concurrent commits land in.
            let mut c = w.open_table(COUNTERS).map_err(err)?;
            let cur_r = c.get("next_region").map_err(err)?.map_or(0, |v| v.value());
            let cur_s = c.get("next_slab").map_err(err)?.map_or(0, |v| v.value());
            c.insert("next_region", next_region.max(cur_r))
                .map_err(err)?;
            c.insert("next_slab", next_slab.max(cur_s)).map_err(err)?;
        }
        w.commit().map_err(err)
    }

    fn put_regions(&self, rs: &[&StoredRegion]) -> Result<(), StoreError> {
        let w = self.db.begin_write().map_err(err)?;
        {
            let mut t = w.open_table(REGIONS).map_err(err)?;
            for r in rs {
                let bytes = postcard::to_stdvec(r).map_err(err)?;
                t.insert(r.map.id, bytes.as_slice()).map_err(err)?;
            }
        }
        w.commit().map_err(err)
    }

    fn delete_region(&self, id: u64) -> Result<(), StoreError> {
        let w = self.db.begin_write().map_err(err)?;
        w.open_table(REGIONS)
            .map_err(err)?
            .remove(id)
            .map_err(err)?;
        w.commit().map_err(err)
    }
}

/// An in-memory store (nothing survives a restart).
#[derive(Debug, Default)]
pub struct MemStore {
    s: Mutex<Snapshot>,
}

impl MetaStore for MemStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        let mut s = self.s.lock().clone();
        s.fix_counters();
        Ok(s)
    }

    fn put_tenant(&self, t: &StoredTenant) -> Result<(), StoreError> {
        self.s.lock().tenants.insert(t.name.clone(), t.clone());
        Ok(())
    }

    fn put_region(
        &self,
        r: &StoredRegion,
        next_region: u64,
        next_slab: u64,
    ) -> Result<(), StoreError> {
        let mut s = self.s.lock();
        s.regions.insert(r.map.id, r.clone());
        s.next_region = s.next_region.max(next_region);
        s.next_slab = s.next_slab.max(next_slab);
        Ok(())
    }

    fn delete_region(&self, id: u64) -> Result<(), StoreError> {
        self.s.lock().regions.remove(&id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(id: u64) -> StoredRegion {
        StoredRegion {
            tenant: "t".into(),
            map: RegionMap {
                id,
                name: Some(format!("r{id}")),
                size: 10,
                slab_size: 4096,
                version: 1,
                redundancy: remora_proto::ctl::Redundancy::Replicate(2),
                slabs: vec![],
                extra: vec![],
            },
        }
    }

    #[test]
    fn redb_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = RedbStore::open(dir.path()).unwrap();
            s.put_tenant(&StoredTenant {
                name: "t".into(),
                token: "x".into(),
                quota: Some(5),
                admin: false,
            })
            .unwrap();
            s.put_region(&region(1), 2, 7).unwrap();
            s.put_region(&region(2), 3, 9).unwrap();
            // A late commit of an earlier allocation does not move counters back.
            s.put_region(&region(1), 2, 7).unwrap();
            s.delete_region(1).unwrap();
        }
        let s = RedbStore::open(dir.path()).unwrap();
        let snap = s.load().unwrap();
        assert_eq!(snap.tenants["t"].quota, Some(5));
        assert_eq!(snap.regions.len(), 1);
        assert_eq!(snap.regions[&2], region(2));
        assert_eq!((snap.next_region, snap.next_slab), (3, 9));
    }

    #[test]
    fn a_store_of_another_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = RedbStore::open(dir.path()).unwrap();
            s.put_region(&region(1), 2, 7).unwrap();
            let w = s.db.begin_write().unwrap();
            w.open_table(COUNTERS).unwrap().insert("schema", 1).unwrap();
            w.commit().unwrap();
        }
        let e = RedbStore::open(dir.path()).unwrap_err();
        assert!(e.to_string().contains("another version"), "{e}");
    }

    #[test]
    fn counters_exceed_every_stored_id() {
        let s = MemStore::default();
        let mut r = region(40);
        let loc = |slab| remora_proto::ctl::SlabLoc {
            server_id: 1,
            addr: "a".into(),
            slab,
            key: 1,
            lost: false,
            restored: false,
        };
        r.map.slabs.push(loc(99));
        r.map.extra.push(loc(120));
        s.put_region(&r, 2, 3).unwrap();
        let snap = s.load().unwrap();
        assert_eq!((snap.next_region, snap.next_slab), (41, 121));
    }
}
