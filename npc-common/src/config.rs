//! Runtime switches the agent sets in the `config` array (one element).
use crate::assert_layout;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// `CONFIG_*` bits.
    pub flags: u32,
    /// Deny events each CPU may emit per second (0 disables events).
    pub events_per_sec: u32,
    /// Burst of deny events each CPU may emit at once.
    pub events_burst: u32,
    pub _pad: u32,
}
assert_layout!(Config, 16, 4);

/// Denials everywhere are counted and reported but not enforced.
pub const CONFIG_AUDIT: u32 = 1 << 0;
/// Traffic from the node's own addresses (`IDENTITY_HOST`) to local pods is allowed.
pub const CONFIG_ALLOW_HOST: u32 = 1 << 1;
/// Packets whose local address is no known endpoint pass (counted) instead of being dropped.
pub const CONFIG_UNKNOWN_ALLOW: u32 = 1 << 2;
/// Established connections survive a policy change that no longer allows them.
pub const CONFIG_GRANDFATHER: u32 = 1 << 3;

impl Default for Config {
    fn default() -> Self {
        Config {
            flags: CONFIG_ALLOW_HOST,
            events_per_sec: 100,
            events_burst: 200,
            _pad: 0,
        }
    }
}

/// `event_rate` per-CPU array value: a token bucket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// Tokens, scaled by `NS_PER_SEC` so refill needs no division.
    pub tokens: u64,
    pub last_ns: u64,
}
assert_layout!(RateLimit, 16, 8);
