//! `remora-bench-worker`: one run of a `remora bench` workload, started by
//! `remora bench` (see `remora_bench::suite::worker`). Its global allocator
//! is `FarAlloc`, so that a paging run can put the whole heap far.

#[global_allocator]
static GLOBAL: remora_paging::FarAlloc = remora_paging::FarAlloc;

fn main() -> std::process::ExitCode {
    remora_bench::suite::worker::main()
}
