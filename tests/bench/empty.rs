//! An empty TC program (`return TC_ACT_UNSPEC`), loaded with the raw bpf(2) syscall: the
//! baseline every datapath figure is compared with.
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use anyhow::{Result, bail};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;

pub struct EmptyProgram {
    fd: OwnedFd,
}

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> libc::c_long {
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    }
}

impl EmptyProgram {
    pub fn load() -> Result<EmptyProgram> {
        // r0 = -1 (TC_ACT_UNSPEC); exit
        let insns: [u64; 2] = [0xffff_ffff_0000_00b7, 0x0000_0000_0000_0095];
        let license = b"GPL\0";
        let mut attr = [0u64; 16];
        attr[0] = u64::from(BPF_PROG_TYPE_SCHED_CLS) | (insns.len() as u64) << 32;
        attr[1] = insns.as_ptr() as u64;
        attr[2] = license.as_ptr() as u64;
        let fd = bpf(BPF_PROG_LOAD, &mut attr);
        if fd < 0 {
            bail!(
                "loading the empty program: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(EmptyProgram {
            fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
        })
    }

    /// Mean ns per run over `repeat` runs of `frame`.
    pub fn time(&self, frame: &[u8], repeat: u32) -> f64 {
        let mut attr = [0u64; 16];
        // prog_fd, retval | data_size_in, data_size_out | data_in | data_out | repeat, duration
        attr[0] = self.fd.as_raw_fd() as u64;
        attr[1] = frame.len() as u64;
        attr[2] = frame.as_ptr() as u64;
        attr[4] = u64::from(repeat);
        let r = bpf(BPF_PROG_TEST_RUN, &mut attr);
        assert!(r == 0, "test run: {}", std::io::Error::last_os_error());
        (attr[4] >> 32) as f64
    }
}
