//! Real traffic between pod namespaces: no enforcement, npc, and an iptables + ipset rule set.
use anyhow::{Result, bail};

use crate::Args;

pub fn run(_args: &Args) -> Result<()> {
    bail!("not written yet")
}
