//! Runs the session fuzz target ([`meridian_pgproxy::fuzz`]) over many inputs:
//! `fuzz_session [INPUTS] [FIRST_SEED] [STEPS]` (defaults 10 000 000, 0, 60). Prints the
//! rate and a summary; a broken invariant panics with the seed that broke it, so it can
//! be replayed with `fuzz_session 1 SEED`.

use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let inputs: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000_000);
    let first: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(0);
    let steps: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(60);
    let started = Instant::now();
    let (mut events, mut closed) = (0u64, 0u64);
    for seed in first..first + inputs {
        // A panic anywhere (not only a broken invariant) names the seed to replay.
        let out = std::panic::catch_unwind(|| {
            let out = meridian_pgproxy::fuzz::run_one(seed, steps);
            meridian_pgproxy::fuzz::decode_one(seed);
            out
        })
        .unwrap_or_else(|_| {
            eprintln!("fuzz_session: panic at seed {seed}; replay: fuzz_session 1 {seed} {steps}");
            std::process::exit(101)
        });
        events += out.events as u64;
        closed += u64::from(out.closed);
        let done = seed - first + 1;
        if done.is_multiple_of(1_000_000) {
            eprintln!(
                "{done} inputs, {:.0} inputs/s",
                done as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "fuzz_session: {inputs} inputs (seeds {first}..{}), {steps} events each, no panic; \
         {events} engine events, {closed} sessions ended by their input; {secs:.1} s ({:.0} inputs/s)",
        first + inputs,
        inputs as f64 / secs
    );
}
