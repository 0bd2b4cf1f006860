//! Control-plane payloads (postcard).
#![no_main]

use libfuzzer_sys::fuzz_target;
use remora_proto::ctl::{decode_reply, decode_request};

fuzz_target!(|input: &[u8]| {
    let _ = decode_request(input);
    let _ = decode_reply(input);
});
