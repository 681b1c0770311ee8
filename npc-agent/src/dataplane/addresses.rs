//! The node's own addresses (identity HOST in the maps): every address configured in the
//! agent's network namespace, loopback aside.
use std::net::IpAddr;

use anyhow::{Context as _, Result};
use futures::TryStreamExt as _;
use netlink_packet_route::address::AddressAttribute;

/// Every non-loopback address of every interface in the calling thread's network namespace,
/// sorted and deduplicated.
pub async fn node_addresses() -> Result<Vec<IpAddr>> {
    let (connection, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    let task = tokio::spawn(connection);
    let mut out = Vec::new();
    let mut addresses = handle.address().get().execute();
    while let Some(msg) = addresses.try_next().await.context("listing addresses")? {
        for attr in &msg.attributes {
            // IFA_LOCAL is the interface's own address on point-to-point links; IFA_ADDRESS
            // otherwise (and the peer's on point-to-point links, which is not ours).
            if let AddressAttribute::Local(ip) | AddressAttribute::Address(ip) = attr
                && !ip.is_loopback()
            {
                out.push(*ip);
            }
        }
    }
    task.abort();
    out.sort();
    out.dedup();
    Ok(out)
}
