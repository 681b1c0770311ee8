//! Denied-connection events to the agent, through a ring buffer, rate-limited per CPU so a flood
//! cannot starve the agent. Suppressed and lost events are counted, never silently dropped.
use npc_common::{Config, Counter, DenyEvent, NS_PER_SEC};

const MAX_REFILL_NS: u64 = 100 * NS_PER_SEC;
const MAX_EVENTS_PER_SEC: u32 = 1_000_000;

use crate::{
    counters::count,
    maps::{EVENT_RATE, EVENTS},
};

/// Takes a token from this CPU's bucket (refilled at `events_per_sec`, capped at `events_burst`).
#[inline(always)]
fn take_token(cfg: &Config, now: u64) -> bool {
    let Some(rl) = EVENT_RATE.get_ptr_mut(0) else {
        return false;
    };
    let rl = unsafe { &mut *rl };
    let cap = cfg.events_burst as u64 * NS_PER_SEC;
    // Tokens are scaled by NS_PER_SEC: one event costs NS_PER_SEC, and each elapsed nanosecond
    // adds `events_per_sec`. Bounding both factors keeps the product far from overflow (BPF has
    // no 128-bit multiply for a saturating one): at most 100 s of refill is credited at once.
    let elapsed = now.saturating_sub(rl.last_ns).min(MAX_REFILL_NS);
    rl.last_ns = now;
    let refill = elapsed * (cfg.events_per_sec.min(MAX_EVENTS_PER_SEC) as u64);
    let tokens = rl.tokens.saturating_add(refill).min(cap);
    if tokens >= NS_PER_SEC {
        rl.tokens = tokens - NS_PER_SEC;
        true
    } else {
        rl.tokens = tokens;
        false
    }
}

/// Sends a deny event filled in by `fill`, written straight into the ring buffer (no stack copy).
#[inline(always)]
pub fn emit(cfg: &Config, now: u64, fill: impl FnOnce(&mut DenyEvent)) {
    if cfg.events_per_sec == 0 {
        return;
    }
    if !take_token(cfg, now) {
        count(Counter::EventsRateLimited);
        return;
    }
    match EVENTS.reserve::<DenyEvent>(0) {
        Some(mut entry) => {
            let event = unsafe { &mut *entry.as_mut_ptr() };
            fill(event);
            entry.submit(0);
            count(Counter::EventsSubmitted);
        }
        None => count(Counter::EventsLost),
    }
}
