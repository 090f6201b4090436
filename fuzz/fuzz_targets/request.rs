//! cargo-fuzz wrapper of the `request` target (fuzz/targets/request.rs).
#![no_main]

#[path = "../targets/mod.rs"]
#[allow(dead_code)]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::request::run(data));
