#![no_main]
//! Everything vpc-ebpf-cni parses from the runtime: environment, CNI_ARGS, the network
//! config on stdin and its prevResult.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vpc_ebpf_cni::fuzz::parse_everything(data);
});
