//! Arbitrary bytes, in arbitrary chunks, through a memory server's
//! connection state machine (handshake, authentication, limits, every
//! operation, direct sends that the socket takes only in part), against a
//! server holding two slabs. The first input bytes choose the chunk size,
//! how much of a direct send the "socket" takes, and the buffer budget.
//! Small keys and ids let the fuzzer find the credentials.
#![no_main]

use libfuzzer_sys::fuzz_target;
use remora_server::session::Harness;

fuzz_target!(|input: &[u8]| {
    let Some((&[chunk, take, budget], bytes)) = input.split_first_chunk::<3>() else {
        return;
    };
    let h = Harness::new(
        4 << 20,
        1 << 20,
        &[(1, 1, 7), (2, 2, 8)],
        3,
        (u64::from(budget) + 1) << 16,
        2,
    );
    let chunks: Vec<&[u8]> = bytes.chunks(usize::from(chunk).max(1)).collect();
    // The harness checks the accounting after every send.
    h.run(&chunks, usize::from(take) * 97);
    assert_eq!(h.charged(), 0, "a closed session gave back its charges");
    assert_eq!(h.open(), (0, 0, 0), "a closed session gave back its slot");
});
