//! A loaded datapath for BPF_PROG_TEST_RUN tests: its own pin directory, removed on drop.
use std::{
    net::IpAddr,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::programs::{TestRun, TestRunOptions};
use npc_agent::dataplane::{AttachMode, Datapath, LoadOptions, remove_pins};
use npc_common::{Config, Direction, verdict};

/// What a program did with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop,
}

pub struct TestDatapath {
    pub dp: Datapath,
    dir: PathBuf,
}

impl TestDatapath {
    /// Loads a fresh datapath with `config`, pinned under a directory unique to this test.
    pub fn new(config: Config) -> TestDatapath {
        TestDatapath::with_attach_mode(config, None)
    }

    /// Like `new`, attaching in `mode` (`None`: what the kernel supports best).
    pub fn with_attach_mode(config: Config, mode: Option<AttachMode>) -> TestDatapath {
        TestDatapath::with_options(config, |opts| opts.attach_mode = mode)
    }

    /// Like `new`, with load options adjusted by `adjust` (the pin directory is the test's own).
    pub fn with_options(config: Config, adjust: impl FnOnce(&mut LoadOptions)) -> TestDatapath {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/npc-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let mut opts = LoadOptions::new(&dir);
        opts.config = config;
        // Small conntrack so many test datapaths fit in memory at once.
        opts.conntrack_capacity = 16_384;
        adjust(&mut opts);
        opts.bpffs = dir.clone();
        let dp = match Datapath::load(&opts) {
            Ok(dp) => dp,
            Err(e) => {
                let _ = remove_pins(&dir);
                panic!("loading the datapath: {e:#}");
            }
        };
        TestDatapath { dp, dir }
    }

    /// Where its maps are pinned.
    pub fn pin_dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Runs `frame` through the program of `dir` (egress = `from_pod`, ingress = `to_pod`).
    pub fn run(&self, dir: Direction, frame: &[u8]) -> Verdict {
        self.try_run(dir, frame).expect("BPF_PROG_TEST_RUN")
    }

    pub fn try_run(
        &self,
        dir: Direction,
        frame: &[u8],
    ) -> Result<Verdict, aya::programs::ProgramError> {
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        };
        let r = self.dp.program(dir).test_run(opts)?;
        Ok(match r.return_value as i32 {
            verdict::PASS => Verdict::Pass,
            verdict::DROP => Verdict::Drop,
            other => panic!("unexpected TC verdict {other}"),
        })
    }

    /// Mean ns/packet over `repeat` runs of one frame (for benchmarks).
    pub fn time(&self, dir: Direction, frame: &[u8], repeat: u32) -> f64 {
        let opts = TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..TestRunOptions::default()
        };
        let r = self
            .dp
            .program(dir)
            .test_run(opts)
            .expect("BPF_PROG_TEST_RUN");
        r.duration.as_nanos() as f64
    }
}

impl Drop for TestDatapath {
    fn drop(&mut self) {
        let _ = remove_pins(&self.dir);
    }
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}
