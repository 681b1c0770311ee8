//! Datapath verdicts through BPF_PROG_TEST_RUN with crafted packets.
use npc_common::{Config, Direction::*};
use npc_tests::{
    datapath::{TestDatapath, Verdict, ip},
    packets::*,
};

#[test]
fn loads_and_drops_unknown() {
    let t = TestDatapath::new(Config::default());
    let v = t.run(Egress, &tcp(ip("10.0.0.1"), 1000, ip("10.0.0.2"), 80, SYN));
    assert_eq!(v, Verdict::Drop);
}
