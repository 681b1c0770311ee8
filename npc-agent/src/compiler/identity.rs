//! Stable numbers for interned keys (pod identities, CIDR identities, rule cookies) across
//! compilations.
use std::{collections::BTreeSet, hash::Hash};

use hashbrown::{Equivalent, HashMap};

/// Hands out numbers in `[first, end)` to keys and keeps them for as long as the key is in use.
///
/// Numbers are allocated from a counter that only moves up; a released number is reused only
/// once the counter has reached `end` (smallest first). So a number that changes meaning is as
/// rare as it can be (16 million pod identities apart), and the result depends only on the
/// sequence of key sets passed to `assign` (deterministic for the same history).
#[derive(Clone, Debug)]
pub(super) struct Interner<K> {
    /// Key -> (number, generation of the last `assign` that used it).
    numbers: HashMap<K, (u32, u64)>,
    generation: u64,
    next: u32,
    end: u32,
    free: BTreeSet<u32>,
}

impl<K: Clone + Eq + Hash + Ord> Interner<K> {
    pub(super) fn new(first: u32, end: u32) -> Self {
        Interner {
            numbers: HashMap::new(),
            generation: 0,
            next: first,
            end,
            free: BTreeSet::new(),
        }
    }

    /// Numbers every key of `used` (the keys this compilation needs; duplicates allowed), in
    /// `used`'s order. Known keys keep their number; new keys get fresh numbers in sorted key
    /// order; keys not in `used` are forgotten, and their numbers are released for later calls
    /// (never reused within this one). `None` only when the number space is exhausted.
    pub(super) fn assign(&mut self, used: &[&K]) -> Vec<Option<u32>> {
        self.assign_with(used, |k| (*k).clone())
    }

    /// [`Interner::assign`] for keys given in a borrowed form `Q` (hashing, comparing and
    /// ordering like `K`), so that only new keys are built (`to_key`).
    pub(super) fn assign_with<Q: Hash + Equivalent<K> + Ord>(
        &mut self,
        used: &[&Q],
        to_key: impl Fn(&Q) -> K,
    ) -> Vec<Option<u32>> {
        self.generation += 1;
        let generation = self.generation;
        let mut out = vec![None; used.len()];
        let mut fresh = Vec::new();
        for (i, key) in used.iter().enumerate() {
            match self.numbers.get_mut(*key) {
                Some(e) => {
                    e.1 = generation;
                    out[i] = Some(e.0);
                }
                None => fresh.push(i),
            }
        }
        fresh.sort_by(|&a, &b| used[a].cmp(used[b]));
        let mut previous: Option<usize> = None;
        for i in fresh {
            if let Some(p) = previous
                && used[p] == used[i]
            {
                out[i] = out[p];
                continue;
            }
            previous = Some(i);
            out[i] = self.alloc();
            if let Some(n) = out[i] {
                self.numbers.insert(to_key(used[i]), (n, generation));
            }
        }
        let free = &mut self.free;
        self.numbers.retain(|_, &mut (n, g)| {
            if g != generation {
                free.insert(n);
            }
            g == generation
        });
        out
    }

    /// Gives `key` the number `n` (an agent adopting the numbers its predecessor wrote to the
    /// maps), and moves the counter past `n`. The caller keeps numbers unique.
    pub(super) fn seed(&mut self, key: K, n: u32) {
        self.numbers.insert(key, (n, self.generation));
        self.reserve_below(n.saturating_add(1));
    }

    /// Never hands out a fresh number below `n` (numbers the maps may still hold).
    pub(super) fn reserve_below(&mut self, n: u32) {
        self.next = self.next.max(n.min(self.end));
    }

    /// The interned key equal to `key`.
    pub(super) fn key<Q: Hash + Equivalent<K>>(&self, key: &Q) -> Option<&K> {
        self.numbers.get_key_value(key).map(|(k, _)| k)
    }

    /// Every key with its number.
    pub(super) fn numbered(&self) -> impl Iterator<Item = (&K, u32)> {
        self.numbers.iter().map(|(k, (n, _))| (k, *n))
    }

    fn alloc(&mut self) -> Option<u32> {
        if self.next < self.end {
            let n = self.next;
            self.next += 1;
            Some(n)
        } else {
            self.free.pop_first()
        }
    }

    /// Number of keys currently holding a number.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.numbers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interner_keeps_numbers_and_reuses_only_after_exhaustion() {
        let mut i: Interner<&str> = Interner::new(10, 13);
        assert_eq!(
            i.assign(&[&"b", &"a"]),
            vec![Some(11), Some(10)],
            "sorted order"
        );
        assert_eq!(
            i.assign(&[&"a", &"c", &"a"]),
            vec![Some(10), Some(12), Some(10)],
            "kept, fresh, duplicate"
        );
        // "b" (11) was released by the previous call; the counter is exhausted now.
        assert_eq!(i.assign(&[&"a", &"d"]), vec![Some(10), Some(11)], "reuse");
        assert_eq!(i.assign(&[&"e"]), vec![Some(12)], "released earlier");
        // 10 and 11 are free; 12 ("e") is released by this very call: not reusable within it.
        assert_eq!(
            i.assign(&[&"f", &"g", &"h"]),
            vec![Some(10), Some(11), None],
            "exhausted within one call"
        );
        assert_eq!(
            i.assign(&[&"h"]),
            vec![Some(12)],
            "smallest released number"
        );
        assert_eq!(i.len(), 1);
    }
}
