//! Memory-server reply payloads, and the offloaded operations' DATA layouts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use remora_proto::data::{decode_reply, Reply};
use remora_proto::offload::{AggregateReply, ChaseReply, FilterReply, ProbeReply};

fuzz_target!(|input: &[u8]| {
    if input.len() < 2 {
        return;
    }
    let kind = u16::from_le_bytes([input[0], input[1]]);
    match decode_reply(kind, &input[2..]) {
        Ok(Reply::Batch(b)) => b.iter().for_each(drop),
        Ok(Reply::Data(d)) => {
            // The first two bytes pick the parameters the layouts depend on.
            let _ = AggregateReply::decode(d);
            if let Ok(f) = FilterReply::decode(d, input[0] % 6, input[1] % 4) {
                f.indices().for_each(drop);
                f.values().for_each(drop);
            }
            let _ = ProbeReply::decode(d);
            if let Ok(c) = ChaseReply::decode(d, kind >> 4) {
                c.iter().for_each(drop);
            }
        }
        _ => {}
    }
});
